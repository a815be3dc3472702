"""``PromptDataModule``: text-to-image prompts for ``predict`` (DiT sampling), from a Recap-COCO-30K-schema parquet.

    python -m experiments predict --config experiments/configs/tiny/dit/base.yaml \
        --config experiments/configs/tiny/dit/sample.yaml \
        --ckpt_path runs/tiny/dit/table7/p0.0/fit/checkpoints/last.ckpt
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from datamodules.checks import RunContext, check_path


def _collate(records: list[Any]) -> dict[str, list]:
    return {"prompt": [r.prompt for r in records], "image_id": [r.image_id for r in records]}


class PromptDataModule(L.LightningDataModule):
    """Batches of ``{"prompt", "image_id"}`` for ``DiTModule.predict_step``.

    Args:
        prompts: The parquet (``image_id`` + the prompt column; the paper: Recap-COCO-30K).
        column: ``caption`` (the raw COCO captions) or ``recaption`` (COCO-Recap).
        batch_size: Prompts per predict batch (one PNG grid each).
        limit: A seeded random subset of this many prompts (None: all).
        seed: Seed of the subset.
    """

    def __init__(self, prompts: str, column: str = "caption", batch_size: int = 64, limit: int | None = None,
                 seed: int = 0):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()

    @classmethod
    def validate_config(cls, args: dict[str, Any], run: RunContext) -> None:
        """Checks before anything is built (``experiments/validate.py``): the prompt parquet exists."""
        check_path("prompts", args.get("prompts"), "file", what="a prompt parquet (Recap-COCO-30K schema)")

    def predict_dataloader(self) -> DataLoader:
        from lightning_modules.evaluation.generation import read_prompt_set

        h = self.hparams
        records = list(read_prompt_set(h.prompts, h.column, limit=h.limit, seed=h.seed))
        return DataLoader(records, batch_size=h.batch_size, shuffle=False, collate_fn=_collate)
