"""``DiTModule``: Recap-DiT, a text-to-image DiT trained on captions mixed at the paper's p (PAPER.md §6, Table 7).

Wiring only (networks, loss and sampler: ``components/dit.py``). Caption-mix batches (``image``, ``caption``) and
latent-cache batches (``latent``, ``text``, ``text_mask``) give the same loss for the same noise (docs/dit.md).
Checkpoints hold the DiT, the null text and the EMA; the frozen text encoder and VAE are loaded from their paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn

from datamodules.caption_mix import DataTransforms
from datamodules.checks import ConfigError, RunContext, check_path
from lightning_modules.common import evaluating
from lightning_modules.components.dit import (
    FrozenCLIPText,
    PixelCodec,
    VAECodec,
    build_dit,
    diffusion_loss,
    dit_forward,
    make_scheduler,
    pad_to_longest,
    parse_dit_size,
    sample,
    save_grid,
    to_uint8,
    trim_to_longest,
)
from lightning_modules.components.schedules import constant_with_warmup, per_step

FROZEN_PREFIXES = ("text_encoder.", "codec.")


def dit_image(image: Any, size: int) -> torch.Tensor:
    """DiT's preprocessing: shorter side to ``size`` (bicubic, antialiased), centre crop, scale to [-1, 1]."""
    from torchvision.transforms import functional as TF

    image = TF.resize(image.convert("RGB"), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.to_tensor(TF.center_crop(image, [size, size])) * 2 - 1


class DiTModule(L.LightningModule):
    """Recap-DiT.

    Args:
        size: ``"DiT-B/4"``, ``"DiT-L/2"`` or a dict of ``num_layers, hidden_size, num_attention_heads, patch_size``.
        text_encoder: Frozen CLIP text tower: an HF ``CLIPTextModel`` folder / name or an ``export-clip`` folder.
            ``vae``: a diffusers ``AutoencoderKL``, or None for pixel space.
        min_snr_gamma: Min-SNR-γ loss weighting (None: plain MSE, as DiT).
        cfg_dropout: Probability of training a sample on the null text (the paper: 0.1): the empty prompt's features
            or, with ``null_text: learned``, a parameter initialised from them.
        random_flip: Flip half the training images horizontally (on latents/pixels, so both data paths augment
            alike). Off where captions name left and right (tiny world).
        ema_decay: EMA decay of the sampling weights (DiT: 0.9999); None disables EMA.
        sampler: ``ddpm`` (the paper's, 250 steps, guidance 10), ``ddim`` or ``dpm``.
        sample_dir: Where ``predict`` writes a PNG grid per batch (noise seeded with ``seed + batch_idx``).
    """

    def __init__(
        self,
        size: str | dict[str, int],
        image_size: int,
        text_encoder: str,
        text_max_length: int | None = None,
        vae: str | None = None,
        vae_subfolder: str | None = None,
        prediction_type: str = "epsilon",
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        min_snr_gamma: float | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        cfg_dropout: float = 0.1,
        random_flip: bool = False,
        null_text: str = "empty",
        ema_decay: float | None = 0.9999,
        sampler: str = "ddpm",
        num_inference_steps: int = 250,
        guidance_scale: float = 10.0,
        sample_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}")
        if null_text not in ("empty", "learned"):
            raise ValueError(f"null_text must be 'empty' or 'learned', got {null_text!r}")
        self.text_encoder: FrozenCLIPText | None = None
        self.codec: nn.Module | None = None
        self.dit: nn.Module | None = None
        self.ema = None
        self.schedule = {"num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule}
        self.schedule["prediction_type"] = prediction_type
        self.noise_scheduler = make_scheduler("ddpm", **self.schedule)

    @classmethod
    def validate_config(cls, args: dict[str, Any], run: RunContext) -> None:
        """Before anything is built (``experiments/validate.py``)."""
        try:
            parse_dit_size(args.get("size"))
        except (ValueError, TypeError) as e:
            raise ConfigError("size", args.get("size"), str(e)) from None
        check_path("text_encoder", args.get("text_encoder"), hub_ok=True, what="a CLIP text tower (HF or export-clip)")
        check_path("vae", args.get("vae"), hub_ok=True, what="a diffusers AutoencoderKL")

    def configure_model(self) -> None:
        if self.dit is not None:
            return
        h = self.hparams
        self.text_encoder = FrozenCLIPText(h.text_encoder, h.text_max_length)
        self.codec = VAECodec(h.vae, h.vae_subfolder) if h.vae else PixelCodec()
        if h.image_size % self.codec.factor:
            raise ValueError(f"image_size {h.image_size} is not divisible by the VAE's factor {self.codec.factor}")
        self.latent_size = h.image_size // self.codec.factor
        self.dit = build_dit(h.size, self.codec.channels, self.latent_size, self.text_encoder.width)
        null, null_mask = trim_to_longest(*self.text_encoder([""]))
        if h.null_text == "learned":
            self.null_text = nn.Parameter(null.clone())
        else:
            self.register_buffer("null_text", null.clone())
        self.register_buffer("null_mask", null_mask.clone())
        if h.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.dit.parameters(), decay=h.ema_decay)

    def data_transforms(self, stage: str) -> DataTransforms:
        return DataTransforms(image=partial(dit_image, size=self.hparams.image_size))  # picklable for loader workers

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(FROZEN_PREFIXES)]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(images.to(self.device))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder(texts)

    def inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, text, mask) from a cached batch or an uncached one."""
        if "latent" in batch:
            return batch["latent"].float(), batch["text"].float(), batch["text_mask"].long()
        return self.encode_images(batch["image"]), *self.encode_text(batch["caption"])

    def drop_text(self, text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor):
        """Replace the rows where ``drop`` is True by the null text (CFG training)."""
        (text, mask), (null, null_mask) = pad_to_longest((text, mask), (self.null_text.to(text.dtype), self.null_mask))
        d = drop[:, None]
        return torch.where(d[..., None], null.expand_as(text), text), torch.where(d, null_mask.expand_as(mask), mask)

    def loss(self, x0, text, mask, noise, t, drop: torch.Tensor) -> torch.Tensor:
        """The training loss for given noise, timesteps and CFG drops (both data paths end here)."""
        text, mask = trim_to_longest(*self.drop_text(text, mask, drop))
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        pred = dit_forward(self.dit, noisy, t, text, mask)
        return diffusion_loss(pred, x0, noise, t, self.noise_scheduler, self.hparams.min_snr_gamma)

    def draw(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise, timesteps and CFG drops for a batch (from torch's RNG, seeded by ``seed_everything``)."""
        n = x0.shape[0]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.hparams.num_train_timesteps, (n,), device=x0.device)
        drop = torch.rand(n, device=x0.device) < self.hparams.cfg_dropout
        return noise, t, drop

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x0, text, mask = self.inputs(batch)
        if self.hparams.random_flip:
            flip = torch.rand(x0.shape[0], device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise, t, drop = self.draw(x0)
        loss = self.loss(x0, text, mask, noise, t, drop)
        n = x0.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/cfg_dropped", drop.float().mean(), batch_size=n)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        x0, text, mask = self.inputs(batch)
        g = torch.Generator(device="cpu").manual_seed(self.hparams.seed + batch_idx)  # the same noise every time
        noise = torch.randn(x0.shape, generator=g).to(x0)
        t = torch.randint(0, self.hparams.num_train_timesteps, (x0.shape[0],), generator=g).to(self.device)
        drop = torch.zeros(x0.shape[0], dtype=torch.bool, device=self.device)
        with self.ema_weights():
            loss = self.loss(x0, text, mask, noise, t, drop)
        self.log("val/loss", loss, prog_bar=True, batch_size=x0.shape[0], sync_dist=True)

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.step(self.dit.parameters())

    def configure_optimizers(self) -> Any:
        h = self.hparams
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=h.betas)
        return per_step(opt, lambda s: constant_with_warmup(s, h.warmup_steps)) if h.warmup_steps else opt

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(FROZEN_PREFIXES)}
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        # the frozen parts come from their own paths (just loaded): fill them in, so loading stays strict
        frozen = {k: v for k, v in self.state_dict().items() if k.startswith(FROZEN_PREFIXES)}
        checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    @contextmanager
    def ema_weights(self):
        """The DiT holds the EMA weights inside, its own weights again after."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.dit.parameters())
        self.ema.copy_to(self.dit.parameters())
        try:
            yield
        finally:
            self.ema.restore(self.dit.parameters())

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seed: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """Images (uint8, N×3×H×W) for ``prompts`` with the configured sampler, steps and guidance."""
        h = self.hparams
        self.configure_model()
        text, mask = trim_to_longest(*self.encode_text(list(prompts)))
        scheduler = make_scheduler(sampler or h.sampler, **self.schedule)
        g = torch.Generator(device="cpu").manual_seed(h.seed if seed is None else seed)
        shape = (self.codec.channels, self.latent_size, self.latent_size)
        steps = num_inference_steps or h.num_inference_steps
        scale = h.guidance_scale if guidance_scale is None else guidance_scale
        with evaluating(self.dit), self.ema_weights() if use_ema else nullcontext():
            x = sample(self.dit, scheduler, text, mask, self.null_text, self.null_mask, shape, steps, scale, g)
        return to_uint8(self.codec.decode(x)).cpu()

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """Prompts (``prompt`` or ``caption`` list) -> images; with ``sample_dir``, a PNG grid per batch."""
        prompts = list(batch["prompt"] if "prompt" in batch else batch["caption"])
        images = self.generate(prompts, seed=self.hparams.seed + batch_idx)
        if self.hparams.sample_dir:
            path = f"{self.hparams.sample_dir}/grid_r{self.global_rank}_b{batch_idx:05d}.png"
            save_grid(images, path, nrow=math.ceil(math.sqrt(len(prompts))), captions=prompts)
        return {"images": images, "prompts": prompts, **({"key": batch["key"]} if "key" in batch else {})}
