"""Data for recap-suite: the caption-mix DataModule, its webdataset stages, caption sidecars and the tiny world.

Imports are lazy so that ``datamodules.tiny_world`` and ``datamodules.sidecar`` do not pay for torch/Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CaptionMixDataModule": "datamodules.caption_mix",
    "DataTransforms": "datamodules.caption_mix",
    "EvalDataModule": "datamodules.eval_sets",
    "LlavaJsonDataModule": "datamodules.llava_json",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
