"""Step checkpoints that survive preemption: every N steps, the last K kept, ``last.ckpt`` replaced atomically.

Lightning's local save ``shutil.move``s a file from the system temp directory, which on another filesystem (usual on
clusters) is a copy: a job killed mid-copy leaves a truncated ``last.ckpt``, the one file a restart reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are rename-atomic (:func:`datamodules.io.atomic_write`); remote paths
    keep Lightning's behaviour (object stores write whole objects)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)

        atomic_write(path, write)


class StepCheckpoint(ModelCheckpoint):
    """Checkpoint every ``every_n_train_steps`` steps as ``step00001234.ckpt``, keep the ``keep_last`` newest (``-1``:
    all; top-K on the step, so it survives restarts), always write ``last.ckpt`` and, with ``save_final``, the final
    step off the grid. ``atomic``: :class:`AtomicCheckpointIO` unless another ``CheckpointIO`` is configured."""

    def __init__(
        self,
        every_n_train_steps: int,
        keep_last: int = 3,
        dirpath: str | None = None,
        filename: str = "step{step:08d}",
        save_weights_only: bool = False,
        save_final: bool = True,
        atomic: bool = True,
    ):
        if every_n_train_steps < 1:
            raise ValueError(f"StepCheckpoint: every_n_train_steps must be >= 1, got {every_n_train_steps}")
        if keep_last == 0 or keep_last < -1:
            raise ValueError(f"StepCheckpoint: keep_last must be >= 1 or -1 (keep all), got {keep_last}")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor="step",
            mode="max",
            save_top_k=keep_last,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            save_weights_only=save_weights_only,
            auto_insert_metric_name=False,
        )
        self.save_final, self.atomic = save_final, atomic

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.atomic and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint saves only on its step grid: a run ending at step 1,234 with N = 500 would leave last.ckpt
        # at step 1,000, and the next stage (which starts from last.ckpt) would miss the final 234 steps.
        if self.save_final and trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
