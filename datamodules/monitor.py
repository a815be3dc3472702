"""Logs which caption source each training sample used and why samples were skipped.

``train/caption_source/<name>`` is the realised fraction of each source since the start of the run (so a run proves
the p it trained on), ``train/skipped/<reason>`` the cumulative count of each skip / fallback reason. The first
occurrence of each reason is also reported once as a warning with the sample's shard and key. When training ends the
exact totals of the whole run are written once more at the last step, with ``train/caption_source_samples`` (the
number of samples they count), so that the last logged value of a run is its realised p (``reproduce`` reads it).
At each logging step, ``train/caption_source_step/<name>`` is the fraction in that step's batch alone and, in a
``p_schedule`` run, ``train/p_target`` the schedule's p at that step (so a log shows the realised p following it).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn


class CaptionMixMonitor(L.Callback):
    """Accumulate ``batch["caption_source"]`` and ``batch["skipped"]`` and log them every ``log_every_n_steps``."""

    def __init__(self) -> None:
        self.sources: Counter = Counter()
        self.skipped: Counter = Counter()
        self._warned: set[str] = set()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict):
            return
        self.sources.update(batch.get("caption_source", ()))
        skipped = batch.get("skipped") or {}
        self.skipped.update(skipped.get("counts", {}))
        for reason, where in skipped.get("examples", {}).items():
            if reason not in self._warned:
                self._warned.add(reason)
                rank_zero_warn(f"caption-mix loader: skipped/fell back ({reason}), first at {where}")
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            metrics = {**self.metrics(), **self.step_metrics(batch)}
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch["caption_source"]))

    def metrics(self) -> dict[str, float]:
        """The fractions of each source and the skip counts since the start of the run."""
        total = sum(self.sources.values())
        metrics = {f"train/caption_source/{k}": v / total for k, v in self.sources.items()}
        metrics.update({f"train/skipped/{k}": float(v) for k, v in self.skipped.items()})
        return metrics

    def step_metrics(self, batch: dict[str, Any]) -> dict[str, float]:
        """This batch's source fractions (every source seen so far, 0 when absent here) and its ``p_target``."""
        step = Counter(batch.get("caption_source", ()))
        n = sum(step.values())
        metrics = {f"train/caption_source_step/{k}": step[k] / n for k in self.sources} if n else {}
        if batch.get("p_target") is not None:
            metrics["train/p_target"] = float(batch["p_target"])
        return metrics

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The periodic log misses the samples after the last logging step: write the run's exact totals (rank 0's
        # view, like the periodic log) at the final step, straight to the loggers (self.log is not allowed here).
        if not self.sources or not trainer.is_global_zero:
            return
        metrics = {**self.metrics(), "train/caption_source_samples": float(sum(self.sources.values()))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    def state_dict(self) -> dict[str, Any]:
        return {"sources": dict(self.sources), "skipped": dict(self.skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sources = Counter(state_dict.get("sources", {}))
        self.skipped = Counter(state_dict.get("skipped", {}))


def add_monitor(trainer: L.Trainer) -> None:
    """Add a :class:`CaptionMixMonitor` unless the trainer has one: the realised caption-source fractions are part
    of what a run must prove, so the caption DataModules bring it along instead of relying on every config."""
    if not any(isinstance(cb, CaptionMixMonitor) for cb in trainer.callbacks):
        trainer.callbacks.append(CaptionMixMonitor())
