"""DiT training-step throughput with and without the latent + text cache, on the same model, shards and batch size.

    python -m benchmarks.dit_cache --preset tiny          # the tiny world's pixel DiT + web-CLIP text (data/world)
    python -m benchmarks.dit_cache --preset real-shapes   # DiT-B/4, SD-VAE-shaped VAE, CLIP-L/14-shaped text, 256 px

Both paths run ``DiTModule.training_step`` + AdamW with loading inside the timed loop; ``real-shapes`` uses random
weights (nothing downloads). Prints s/step of both, the ratio (goal >= 2x) and the cache pre-pass time; details and
figures: ``docs/dit.md``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, parser, write_json


def random_vae(folder: Path) -> str:
    """A random-weight VAE folder with Stable Diffusion's VAE shapes (4 latent channels, 8x down)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
    shape = {"latent_channels": 4, "layers_per_block": 2, "sample_size": 256}
    blocks["block_out_channels"] = (128, 256, 512, 512)
    AutoencoderKL(in_channels=3, out_channels=3, **shape, **blocks).save_pretrained(folder)
    return str(folder)


def random_text_tower(folder: Path, tokenizer: str, **sizes: Any) -> str:
    """A random-weight CLIP text tower folder of ``sizes`` (``CLIPTextConfig`` fields) with ``tokenizer``."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), **ids, **sizes)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _head_shard(src: str, dest: Path, n: int) -> str:
    """The first ``n`` samples of shard ``src`` as a new shard (with its sidecar): a short real-shapes pre-pass."""
    import shutil
    import tarfile

    keys: set[str] = set()
    with tarfile.open(src) as tin, tarfile.open(dest / Path(src).name, "w") as tout:
        for m in tin:  # a sample's files are contiguous
            keys.add(m.name.split(".", 1)[0])
            if len(keys) > n:
                break
            tout.addfile(m, tin.extractfile(m))
    side = Path(src).parent.parent / "sidecars" / (Path(src).stem + ".parquet")
    (dest / "sidecars").mkdir(exist_ok=True)
    shutil.copy(side, dest / "sidecars" / side.name)  # extra keys in a sidecar are unused
    return str(dest / Path(src).name)


def _steps(module: Any, loader: Any, n: int, skip: int) -> float:
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    it = iter(loader)
    t0 = time.perf_counter()
    for i in range(n + skip):
        if i == skip:
            t0 = time.perf_counter()
        batch = next(it)
        loss = module.training_step(batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser("dit_cache", __doc__)
    p.add_argument("--preset", choices=["tiny", "real-shapes"], default="tiny")
    p.add_argument("--world", default=str(ROOT / "data/world"))
    p.add_argument("--shards", default=None, help="default: 2 (tiny) or 1 (real-shapes) web shards of --world")
    p.add_argument("--text-encoder", default=str(ROOT / "runs/tiny/captioner/web_clip/export"), help="tiny preset")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 (tiny), 8 (real-shapes)")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 20 (tiny), 4 (real-shapes)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps, untimed")
    p.add_argument("--num-workers", type=int, default=0, help="loader workers of the uncached path")
    p.add_argument("--samples", type=int, default=64, help="real-shapes: samples of the one shard used")
    args = p.parse_args(argv)
    from benchmarks.gpu_checks import REAL_TEXT
    from datamodules.caption_mix import CaptionMixDataModule
    from datamodules.latent_cache import LatentCacheDataModule, build_cache
    from lightning_modules.dit import DiTModule

    tiny = args.preset == "tiny"
    batch = args.batch_size or (128 if tiny else 8)
    steps = args.steps or (20 if tiny else 4)
    world = Path(args.world)
    shards = args.shards or str(world / ("web/{00000..00001}.tar" if tiny else "web/00000.tar"))
    sources = {"original": "txt", "recaption": "sidecar:re_caption"}
    sidecars = str(world / "sidecars")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not tiny and args.shards is None:  # 256 px through a VAE on CPU: a short shard keeps the pre-pass short
            shards, sidecars = _head_shard(str(world / "web/00000.tar"), tmp, args.samples), str(tmp / "sidecars")
        if tiny:
            size = {"num_layers": 6, "hidden_size": 128, "num_attention_heads": 4, "patch_size": 2}
            model = {"size": size, "image_size": 16, "text_encoder": args.text_encoder}
        else:  # random-weight folders of SD's VAE and OpenAI CLIP ViT-L/14's text tower
            text = random_text_tower(tmp / "text", str(world / "tokenizer"), **REAL_TEXT)
            model = {"size": "DiT-B/4", "image_size": 256, "text_max_length": 77, "text_encoder": text}
            model["vae"] = random_vae(tmp / "vae")
        module = DiTModule(**model, ema_decay=None, cfg_dropout=0.1)
        module.configure_model()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        common = {"sources": sources, "sidecar_dir": sidecars, "batch_size": batch}
        totals = build_cache(module, shards, tmp / "cache", **common, dtype="float16")
        prepass = time.perf_counter() - t0
        loading = {"num_workers": args.num_workers, "shuffle_buffer": 256, "shuffle_initial": 64, "resampled": True}
        loading |= {"persistent_workers": False, "train_num_samples": totals["samples"]}
        transform = module.data_transforms("fit").image
        uncached = CaptionMixDataModule(shards, **common, p_original=0.5, **loading, image_transform=transform)
        cached = LatentCacheDataModule(str(tmp / "cache"), batch_size=batch, p_original=0.5)
        report: dict[str, Any] = {"preset": args.preset, "batch_size": batch, "steps": steps}
        report |= {"cache_prepass_s": prepass, "cached_samples": totals["samples"]}
        report["dit_params"] = sum(p.numel() for p in module.dit.parameters())
        uncached.setup("fit")
        paths = []
        for name, dm in (("uncached", uncached), ("cached", cached)):
            sec = _steps(module, dm.train_dataloader(), steps, args.skip)
            report |= {f"{name}_s_per_step": sec, f"{name}_samples_per_s": batch / sec}
            paths.append(f"{name} {sec:.3f} s/step ({batch / sec:.0f} samples/s)")
        report["ratio_cached_over_uncached"] = report["uncached_s_per_step"] / report["cached_s_per_step"]
    ratio = report["ratio_cached_over_uncached"]
    print(f"{args.preset}: {', '.join(paths)}: {ratio:.2f}x; pre-pass {prepass:.1f} s for {totals['samples']} samples")
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
