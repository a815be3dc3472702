"""Data for recap-suite: the caption-mix DataModule, its webdataset stages, caption sidecars and the tiny world.

Imports are lazy so that ``datamodules.tiny_world`` and ``datamodules.sidecar`` do not pay for torch/Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CaptionMixDataModule", "DataTransforms"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("datamodules.caption_mix"), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
