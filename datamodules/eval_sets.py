"""``EvalDataModule``: the evaluation tasks (``lightning_modules.evaluation``) as Lightning test loaders, one per task.

``python -m experiments test --config <model>.yaml --config experiments/configs/eval/<suite>.yaml --ckpt_path X``:
the LightningModule encodes the images in ``test_step`` and scores each task with ``task.compute`` at epoch end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader


class EvalDataModule(L.LightningDataModule):
    """Evaluation tasks as test dataloaders.

    Args:
        tasks: Evaluation tasks (``lightning_modules.evaluation`` classes, e.g. ``ZeroShotClassification``).
        batch_size: Images per batch.
        num_workers: Loader worker processes per task.
    """

    def __init__(self, tasks: Sequence[Any], batch_size: int = 256, num_workers: int = 0):
        super().__init__()
        if not tasks:
            raise ValueError("EvalDataModule needs at least one evaluation task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation task names must be unique (metrics are keyed by them): {names}")
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.num_workers = num_workers

    def _transform(self) -> Any:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "data_transforms"):
            raise ValueError("EvalDataModule takes its image transform from the LightningModule's data_transforms()")
        return module.data_transforms("test").image

    def test_dataloader(self) -> list[DataLoader]:
        transform = self._transform()
        return [
            DataLoader(t.image_dataset(transform), self.batch_size, num_workers=self.num_workers) for t in self.tasks
        ]
