"""Recap-DiT's parts: a text-conditioned DiT (diffusers ``PixArtTransformer2DModel``), a frozen CLIP text encoder, an
image codec (a VAE, or pixels for the tiny world), the diffusion loss and CFG sampling with diffusers' schedulers.
The paper (PAPER.md §6) names no CLIP text tower nor length: the configs pick SD 1.x's (ViT-L/14, 77 tokens).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# DiT's model family (Peebles & Xie, Table 1): depth, hidden size, heads; "/P" is the patch size.
DIT_SIZES: dict[str, dict[str, int]] = {
    "DiT-S": {"num_layers": 12, "hidden_size": 384, "num_attention_heads": 6},
    "DiT-B": {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12},
    "DiT-L": {"num_layers": 24, "hidden_size": 1024, "num_attention_heads": 16},
    "DiT-XL": {"num_layers": 28, "hidden_size": 1152, "num_attention_heads": 16},
}


def parse_dit_size(size: str | Mapping[str, int]) -> dict[str, int]:
    """``"DiT-B/4"`` -> depth/width/heads/patch; a mapping with those four keys passes through (tiny models)."""
    if not isinstance(size, str):
        need = {"num_layers", "hidden_size", "num_attention_heads", "patch_size"}
        missing = need - set(size)
        if missing:
            raise ValueError(f"DiT size dict needs {sorted(need)}; missing {sorted(missing)}")
        return {k: int(v) for k, v in size.items()}
    name, _, patch = size.partition("/")
    if name not in DIT_SIZES or not patch.isdigit():
        raise ValueError(f"unknown DiT size {size!r}; use one of {[f'{k}/2' for k in DIT_SIZES]} (or /4, /8)")
    return {**DIT_SIZES[name], "patch_size": int(patch)}


def build_dit(
    size: str | Mapping[str, int], in_channels: int, sample_size: int, caption_channels: int, **kwargs: Any
) -> nn.Module:
    """A PixArt-style DiT of a DiT size with fixed variance, initialised as PixArt-α / DiT: zero cross-attention
    output projections and final layer (every block starts as the identity on the text path, the first output 0)."""
    from diffusers import PixArtTransformer2DModel

    s = parse_dit_size(size)
    if s["hidden_size"] % s["num_attention_heads"]:
        raise ValueError(f"hidden_size {s['hidden_size']} is not divisible by heads {s['num_attention_heads']}")
    if sample_size % s["patch_size"]:
        raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {s['patch_size']}")
    model = PixArtTransformer2DModel(
        num_attention_heads=s["num_attention_heads"],
        attention_head_dim=s["hidden_size"] // s["num_attention_heads"],
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=s["num_layers"],
        cross_attention_dim=s["hidden_size"],
        sample_size=sample_size,
        patch_size=s["patch_size"],
        caption_channels=caption_channels,
        use_additional_conditions=False,
        **kwargs,
    )
    for layer in [*(block.attn2.to_out[0] for block in model.transformer_blocks), model.proj_out]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def dit_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor):
    """The DiT's prediction for noisy ``x`` at timesteps ``t`` given text features and their 0/1 mask."""
    text_kw = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
    return model(
        x, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False, **text_kw
    )[0]


class FrozenCLIPText(nn.Module):
    """Per-token features of a frozen CLIP text tower with their mask (1 up to and including end-of-text): an HF
    ``CLIPTextModel``'s last hidden states (as Stable Diffusion) or an ``export-clip`` folder's after ``ln_final``.
    Texts over ``max_length`` tokens are cut and counted."""

    def __init__(self, source: str, max_length: int | None = None, trust_remote_code: bool = False):
        super().__init__()
        self.source = str(source)
        self.kind = "open_clip" if (Path(self.source) / "open_clip_config.json").exists() else "hf"
        if self.kind == "open_clip":
            import open_clip

            model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{self.source}")
            tower = model.text if hasattr(model, "text") else model
            self.token_embedding, self.positional_embedding = tower.token_embedding, tower.positional_embedding
            self.transformer, self.ln_final = tower.transformer, tower.ln_final
            self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
            context = int(self.positional_embedding.shape[0])
            self.tokenizer = open_clip.get_tokenizer(f"local-dir:{self.source}", context_length=context)
            self.width = int(self.ln_final.weight.shape[0])
        else:
            from transformers import AutoTokenizer, CLIPTextModel

            self.model = CLIPTextModel.from_pretrained(self.source, trust_remote_code=trust_remote_code)
            self.tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=trust_remote_code)
            context = int(self.model.config.max_position_embeddings)
            self.width = int(self.model.config.hidden_size)
        self.max_length = min(max_length or context, context)
        self.n_truncated = 0
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenCLIPText:
        return super().train(False)  # frozen: dropout etc. never on

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.parameters()).device
        if self.kind == "open_clip":
            ids = self.tokenizer(list(texts)).to(device)
            eot = ids.argmax(dim=-1)  # open_clip: end-of-text is the largest id; padding is 0
            self.n_truncated += int((ids[:, -1] != 0).sum())  # the tokenizer cut these to the context
            x = self.token_embedding(ids) + self.positional_embedding
            x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
            mask = (torch.arange(ids.shape[1], device=device)[None] <= eot[:, None]).long()
        else:
            full = self.tokenizer(list(texts), padding=False, truncation=False)["input_ids"]
            self.n_truncated += sum(len(f) > self.max_length for f in full)
            kw = {"padding": "max_length", "truncation": True, "max_length": self.max_length, "return_tensors": "pt"}
            enc = self.tokenizer(list(texts), **kw).to(device)
            x = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].long()
        x, mask = x[:, : self.max_length], mask[:, : self.max_length]
        return x.float() * mask[..., None], mask


def pad_to_longest(*texts: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(features, mask)`` pairs padded with zeros to the longest one's number of tokens."""
    n = max(text.shape[1] for text, _ in texts)
    return [(F.pad(text, (0, 0, 0, n - text.shape[1])), F.pad(mask, (0, n - mask.shape[1]))) for text, mask in texts]


def trim_to_longest(text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions that no text in the batch uses (cross-attention cost follows the length)."""
    n = int(mask.sum(1).max().clamp(min=1))
    return text[:, :n], mask[:, :n]


class PixelCodec(nn.Module):
    """Pixel space (the tiny world, where no pretrained VAE exists): images in [-1, 1] are the diffusion space."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels, self.factor = channels, 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1, 1)


class VAECodec(nn.Module):
    """A frozen diffusers ``AutoencoderKL``: latents = posterior mean × scaling factor (DiT and PixArt sample; the
    mean makes cached latents deterministic, which the cache needs)."""

    def __init__(self, path: str, subfolder: str | None = None):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder)
        self.vae.requires_grad_(False).eval()
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.channels = int(self.vae.config.latent_channels)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> VAECodec:
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.vae.encode(images).latent_dist.mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(x / self.scale + self.shift).sample.clamp(-1, 1)


def make_scheduler(kind: str = "ddpm", **config: Any) -> Any:
    """A diffusers scheduler by name (``ddpm``, ``ddim``, ``dpm``) from the one noise-schedule config of training."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
    if kind not in classes:
        raise ValueError(f"unknown scheduler {kind!r}; use one of {sorted(classes)}")
    cfg = {"clip_sample": False, **config}
    if kind == "ddpm":
        cfg.setdefault("variance_type", "fixed_small")
    else:  # few-step samplers must start at the last training step (pure noise), not ~1000/n below it
        cfg.setdefault("timestep_spacing", "trailing")
    if kind == "ddim":
        cfg.setdefault("set_alpha_to_one", False)
    if kind == "dpm":
        cfg.pop("clip_sample")
    return classes[kind](**cfg)


def diffusion_loss(pred, x0, noise, t, scheduler: Any, min_snr_gamma: float | None = None) -> torch.Tensor:
    """MSE against the scheduler's target (``epsilon``, ``v_prediction`` or ``sample``), optionally min-SNR-γ
    weighted (Hang et al. 2023: the loss goes to the low-SNR steps where layout, colour and shape are decided)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    elif kind == "sample":
        target = x0
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
    if min_snr_gamma:
        a = scheduler.alphas_cumprod.to(t.device)[t].float()
        s = a / (1 - a)  # the signal-to-noise ratio at t
        clipped = torch.minimum(s, torch.full_like(s, min_snr_gamma))
        weight = {"epsilon": clipped / s, "v_prediction": clipped / (s + 1), "sample": clipped}[kind]
        per = per * weight
    return per.mean()


@torch.no_grad()
def sample(
    model: nn.Module,
    scheduler: Any,
    text: torch.Tensor,
    mask: torch.Tensor,
    null_text: torch.Tensor,
    null_mask: torch.Tensor,
    shape: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Classifier-free guided sampling, ``uncond + s * (cond - uncond)`` (``s`` = 1: one forward per step);
    ``null_text``/``null_mask`` (one row) are the unconditional text."""
    n = text.shape[0]
    device = text.device
    x = torch.randn((n, *shape), generator=generator, device="cpu").to(device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=device)
    guided = guidance_scale != 1.0
    if guided:
        (text, mask), (nt, nm) = pad_to_longest((text, mask), (null_text, null_mask))
        text = torch.cat([text, nt.expand(n, -1, -1)])
        mask = torch.cat([mask, nm.expand(n, -1)])
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if guided else x
        inp = scheduler.scale_model_input(inp, t)
        pred = dit_forward(model, inp, t.expand(inp.shape[0]).to(device), text, mask).float()
        if guided:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(pred, t, x, generator=generator).prev_sample
    return x


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 (N, 3, H, W)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, captions: Sequence[str] | None = None) -> Path:
    """A PNG grid of uint8 images (N, 3, H, W) for people to look at; ``captions`` go to a ``.json`` beside it."""
    from torchvision.utils import make_grid, save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images.float() / 255, nrow=nrow, padding=2, pad_value=1.0), path)
    if captions is not None:
        path.with_suffix(".json").write_text(json.dumps(list(captions), indent=1))
    return path
