"""Evaluation harness in plain PyTorch: CLIP retrieval / classification tasks and their loop, caption attributes.

Used by the CLIP LightningModule (in the loop and as ``test``), by the DiT module and by reports. No Lightning here.
"""

from .captioning import CaptionAttributes
from .metrics import retrieval_metrics, retrieval_recall, token_lengths, topk_accuracy
from .tasks import (
    EvalTask,
    LongRetrieval,
    Retrieval,
    ZeroShotClassification,
    features_by_index,
    resolve_classnames,
    resolve_templates,
    run_tasks,
    write_metrics_json,
    zero_shot_classifier,
)

__all__ = [
    "CaptionAttributes",
    "EvalTask",
    "LongRetrieval",
    "Retrieval",
    "ZeroShotClassification",
    "features_by_index",
    "resolve_classnames",
    "resolve_templates",
    "retrieval_metrics",
    "retrieval_recall",
    "run_tasks",
    "token_lengths",
    "topk_accuracy",
    "write_metrics_json",
    "zero_shot_classifier",
]
