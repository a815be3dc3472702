"""``ClipModule``: contrastive image-text training (Recap-CLIP) on the caption-mix DataModule.

This is the foundation's first version: an open_clip model, open_clip's ``ClipLoss`` with the global batch gathered
across ranks, AdamW with a linear warm-up + cosine schedule, and the model's own transforms handed to the DataModule.
Named paper sizes, CLIPA two-stage resolution and the evaluation harness come on top of it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from open_clip import ClipLoss

from datamodules.caption_mix import DataTransforms
from lightning_modules.components.clip_model import TokenizeOne, build_clip


class ClipModule(L.LightningModule):
    """Contrastive training of an open_clip model.

    Args:
        model: open_clip model name, ``local-dir:PATH``, a JSON config path, or the config dict.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay, applied to matrices only (not to gains, biases, logit scale).
        betas: AdamW betas.
        warmup_steps: Linear warm-up steps before the cosine decay (decays to 0 at ``trainer.max_steps``).
        context_length: Text context length (the paper uses 128); ``None`` keeps the model's.
    """

    def __init__(
        self,
        model: str | dict[str, Any],
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 0,
        context_length: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        parts = build_clip(model, context_length)
        self.model = parts.model
        self._parts = parts
        self.loss_fn = ClipLoss()
        self._t0: float | None = None

    # ---------------------------------------------------------------------------------------------------- data
    def data_transforms(self, stage: str) -> DataTransforms:
        image = self._parts.preprocess_train if stage == "fit" else self._parts.preprocess_val
        return DataTransforms(image=image, text=TokenizeOne(self._parts.tokenizer))

    def setup(self, stage: str) -> None:
        # Gather the whole global batch with gradients (open_clip's distributed recipe): every rank computes the
        # loss of its local rows against all columns, which is the single-process loss on the concatenated batch.
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)

    # ----------------------------------------------------------------------------------------------- training
    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(image, text)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch["image"], batch["text"])
        loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", out["logit_scale"], batch_size=bs)
        if self._t0 is None:
            self._t0, self._seen = time.perf_counter(), 0
        else:
            self._seen += bs * self.trainer.world_size
            self.log("train/samples_per_sec", self._seen / (time.perf_counter() - self._t0), batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # open_clip clamps the temperature at 100 after each step
            self.model.logit_scale.clamp_(0, math.log(100))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch["image"], batch["text"])
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        labels = torch.arange(len(logits), device=logits.device)
        loss = (
            torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
        ) / 2
        bs = len(logits)
        self.log("val/loss", loss, batch_size=bs, sync_dist=True)
        self.log("val/i2t_in_batch_top1", (logits.argmax(1) == labels).float().mean(), batch_size=bs, sync_dist=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # open_clip's rule: no weight decay on gains, biases, norms, embeddings-as-scales and the temperature
            (no_decay if p.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            total = self.trainer.estimated_stepping_batches
        warmup = self.hparams.warmup_steps

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
