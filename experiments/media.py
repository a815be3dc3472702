"""Sample images and captions to W&B, so a run shows what it trained on at its p (a no-op without a ``WandbLogger``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

COLUMNS = ["key", "source", "caption", "image"]


def to_uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """``N x C x H x W`` images -> ``H x W x C`` uint8 arrays; float ones (normalised by a model) min-max scaled."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        x = images.float()
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        images = ((x - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8)
    return [img.permute(1, 2, 0).numpy() for img in images]


def batch_samples(batch: Mapping[str, Any], pl_module: Any, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` samples of a caption-mix, prompt or LLaVA json batch as ``{"key", "source", "caption", "image"}``
    (image: uint8 HWC array or None; latent-cache batches give captions only)."""
    if not isinstance(batch, Mapping):
        return []
    captions = batch.get("caption") or batch.get("prompt")
    labels, tokenizer = batch.get("labels"), getattr(pl_module, "tokenizer", None)
    if captions is None and labels is not None and tokenizer is not None:  # LLaVA json: the supervised tokens
        captions = [tokenizer.decode(row[row != -100].tolist(), skip_special_tokens=True).strip() for row in labels]
    images = batch.get("image")
    if not isinstance(images, torch.Tensor):
        images = batch.get("pixel_values")
    size = len(captions) if captions is not None else (len(images) if isinstance(images, torch.Tensor) else 0)
    k = min(n, size)
    if k == 0:
        return []
    arrays: list[np.ndarray | None] = [None] * k
    # LLaVA json batches stack images only for samples that have one: pair them by position only when all have one.
    if isinstance(images, torch.Tensor) and images.ndim == 4 and len(images) == size:
        arrays = list(to_uint8_images(images[:k]))
    keys = batch.get("key") or batch.get("id") or [str(i) for i in range(size)]
    sources = batch.get("caption_source") or [""] * size
    captions = captions if captions is not None else [""] * size
    return [
        {"key": str(keys[i]), "source": str(sources[i]), "caption": str(captions[i]), "image": arrays[i]}
        for i in range(k)
    ]


class WandbMediaCallback(Callback):
    """A ``wandb.Table`` (key, caption source, caption, image) and the captioned images of the first training batch and
    of every validation's first batch; a module with ``generate(prompts)`` (the DiT) also gets a grid for
    ``dit_prompts`` (default: the first validation captions) every ``dit_every_n_validations``-th validation."""

    def __init__(
        self,
        num_samples: int = 8,
        log_train_start: bool = True,
        log_validation: bool = True,
        dit_prompts: Sequence[str] | None = None,
        dit_every_n_validations: int = 1,
        dit_num_inference_steps: int | None = None,
    ) -> None:
        self.num_samples, self.log_train_start, self.log_validation = num_samples, log_train_start, log_validation
        self.dit_prompts = list(dit_prompts) if dit_prompts else None
        self.dit_every_n_validations = max(1, dit_every_n_validations)
        self.dit_num_inference_steps = dit_num_inference_steps
        self._train_logged = False
        self._validations = 0
        self._val_prompts: list[str] | None = None

    @staticmethod
    def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)] if trainer.is_global_zero else []

    def log_samples(self, trainer: L.Trainer, key: str, samples: list[dict[str, Any]]) -> None:
        import wandb

        if not samples:
            return
        rows = [
            [s["key"], s["source"], s["caption"], None if s["image"] is None else wandb.Image(s["image"])]
            for s in samples
        ]
        with_images = [s for s in samples if s["image"] is not None]
        images = [s["image"] for s in with_images]
        captions = [f"[{s['source']}] {s['caption']}" if s["source"] else s["caption"] for s in with_images]
        for logger in self.wandb_loggers(trainer):
            logger.log_table(key=f"{key}/table", columns=COLUMNS, data=rows, step=trainer.global_step)
            if images:
                logger.log_image(key=f"{key}/images", images=images, caption=captions, step=trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if self._train_logged or not self.log_train_start or not self.wandb_loggers(trainer):
            return
        self._train_logged = True
        self.log_samples(trainer, "media/train_samples", batch_samples(batch, pl_module, self.num_samples))

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx or dataloader_idx or trainer.sanity_checking or not self.wandb_loggers(trainer):
            return
        samples = batch_samples(batch, pl_module, self.num_samples)
        if self._val_prompts is None and samples:
            self._val_prompts = [s["caption"] for s in samples if s["caption"]]
        if self.log_validation:
            self.log_samples(trainer, "media/val_samples", samples)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        generate = getattr(pl_module, "generate", None)
        if trainer.sanity_checking or not callable(generate) or not self.wandb_loggers(trainer):
            return
        self._validations += 1
        prompts = self.dit_prompts or self._val_prompts
        if self._validations % self.dit_every_n_validations or not prompts:
            return
        kwargs = {"num_inference_steps": self.dit_num_inference_steps} if self.dit_num_inference_steps else {}
        images = generate(prompts, **kwargs)
        import wandb
        from torchvision.utils import make_grid

        grid = make_grid(images, nrow=max(1, math.ceil(math.sqrt(len(images)))), padding=2).permute(1, 2, 0).numpy()
        grid = wandb.Image(grid, caption=" | ".join(prompts))
        samples = [
            {"key": str(i), "source": "generated", "caption": p, "image": img}
            for i, (p, img) in enumerate(zip(prompts, to_uint8_images(images), strict=True))
        ]
        for logger in self.wandb_loggers(trainer):
            logger.log_metrics({"media/dit_samples/grid": grid}, step=trainer.global_step)
        self.log_samples(trainer, "media/dit_samples", samples)
