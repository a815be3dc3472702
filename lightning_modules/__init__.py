"""LightningModules of recap-suite. They wire plain networks from ``components`` to data, losses and logging.

Imports are lazy, so that ``lightning_modules.evaluation`` and ``lightning_modules.components`` can be used (by
reports, the DiT's metrics, notebooks) without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"ClipModule": "lightning_modules.clip", "CaptionerModule": "lightning_modules.captioner"}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
