"""Evaluation in plain PyTorch (no Lightning): CLIP tasks and their loop, text-to-image metrics, caption attributes and
the tiny world's attribute judge. The CLIP, captioner and DiT modules and the experiments CLI call these."""

from .attribution import VGAttribution
from .captioning import CaptionAttributes
from .long_caption import DCIRetrieval, DOCCIRetrieval, IIWRetrieval, ShareGPT4VRetrieval
from .tasks import LongRetrieval, Retrieval, ZeroShotClassification, features_by_index, run_tasks, write_metrics_json

__all__ = [
    "CaptionAttributes",
    "DCIRetrieval",
    "DOCCIRetrieval",
    "IIWRetrieval",
    "LongRetrieval",
    "Retrieval",
    "ShareGPT4VRetrieval",
    "VGAttribution",
    "ZeroShotClassification",
    "features_by_index",
    "run_tasks",
    "write_metrics_json",
]
