"""The tiny world's pinned attribute judge: GenEval-like accuracy and the FID feature extractor for the DiT.

:class:`AttributeJudge`, a small CNN trained on a world's ground truth (:func:`train_judge`), predicts the main
object's colour, shape and position, the object count and the background kind (``HEADS``); its pooled features
(:class:`JudgeFeatures`) stand in for Inception-v3 in FID. Saved as ``judge.safetensors`` and ``judge.json``, written
last, so it marks the folder complete. docs/dit.md ("The pinned attribute judge") has its design and measurements.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from datamodules.io import atomic_write
from datamodules.tiny_world.scene import BACKGROUND_KINDS, COLOURS, POSITIONS, SHAPES
from datamodules.tiny_world.writer import world_fingerprint

from .metrics import derangement

RECIPE_VERSION = 1
WEIGHTS_NAME = "judge.safetensors"
JSON_NAME = "judge.json"
COUNTS: tuple[str, ...] = ("1", "2", "3")
TRUTH_COLUMNS = ["objects", "background", "main_index"]
# Every head's label names, index = class; colour/shape/position are the main object's.
HEADS = {"colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "count": COUNTS, "background": BACKGROUND_KINDS}
# A horizontal flip swaps left and right and keeps every other label (all six shapes are mirror-symmetric).
_FLIP_POSITION = [POSITIONS.index({"left": "right", "right": "left"}.get(p, p)) for p in POSITIONS]
CHANCE_SEED_TAG = 0x6A756467  # seeds the chance derangement apart from other seeded draws

# The defaults fit one training in about 4 CPU minutes (docs/dit.md, "The pinned attribute judge").
DEFAULT_IMAGE_SIZE = 32
DEFAULT_WIDTHS = (48, 96, 192)


def as_float_images(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


def resize_images(x: Tensor, size: int) -> Tensor:
    """Square float ``(N, C, H, W)`` images to ``size``: area average for integer shrink factors (what training
    used), antialiased bilinear for other shrinks, bilinear for enlargements."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected square (N, C, H, W) images, got shape {tuple(x.shape)}")
    side = x.shape[-1]
    if side == size:
        return x
    if side > size and side % size == 0:
        return F.avg_pool2d(x, side // size)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=side > size, align_corners=False)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class AttributeJudge(nn.Module):
    """3x3 conv-BN-ReLU layers, global pooling (``"avgmax"``: average and max concatenated; ``"avg"``) and one linear
    head per attribute; inputs are uint8 or [0, 1] float square images, resized and normalised inside. ``freeze()``
    (what :func:`load_judge` returns) pins eval mode: a parent's ``.train()`` leaves BatchNorm alone."""

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, widths: Sequence[int] = DEFAULT_WIDTHS, pool="avgmax"):
        super().__init__()
        if image_size < 8:
            raise ValueError("image_size must be >= 8")
        if pool not in ("avg", "avgmax"):
            raise ValueError("pool must be 'avg' or 'avgmax'")
        w0, w1, w2 = (int(w) for w in widths)
        self.image_size, self.widths, self.pool = int(image_size), (w0, w1, w2), pool
        self.register_buffer("mean", torch.full((3,), 0.5))
        self.register_buffer("std", torch.full((3,), 0.25))
        self.body = nn.Sequential(
            _conv_bn(3, w0, 2), _conv_bn(w0, w0, 1), _conv_bn(w0, w1, 2), _conv_bn(w1, w1, 1), _conv_bn(w1, w2, 2)
        )
        self.num_features = w2 * (2 if pool == "avgmax" else 1)
        self.heads = nn.ModuleDict({name: nn.Linear(self.num_features, len(labels)) for name, labels in HEADS.items()})
        self._frozen = False

    def config(self) -> dict:
        widths = list(self.widths)
        return {"image_size": self.image_size, "widths": widths, "pool": self.pool, "num_features": self.num_features}

    def features(self, images: Tensor) -> Tensor:
        """Pooled penultimate features ``(N, num_features)``."""
        x = resize_images(as_float_images(images.to(self.mean.device)), self.image_size)
        h = self.body((x - self.mean[:, None, None]) / self.std[:, None, None])
        if self.pool == "avgmax":
            return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return h.mean(dim=(2, 3))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}

    def predict(self, images: Tensor, batch_size: int = 512) -> dict[str, Tensor]:
        """Argmax class index per head, ``{head: (N,) long}``, in batches, without gradients (mode unchanged)."""
        return _predict(self, images, batch_size)

    def freeze(self) -> AttributeJudge:
        self._frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> AttributeJudge:
        return super().train(False if self._frozen else mode)


class JudgeFeatures(nn.Module):
    """A judge's pooled features as a torchmetrics custom FID extractor (``FrechetInceptionDistance(feature=...)``
    reads ``num_features`` and passes ``update``'s images unchanged); always in eval mode, as torchmetrics' own."""

    def __init__(self, judge: AttributeJudge) -> None:
        super().__init__()
        self.judge = judge
        self.num_features = int(judge.num_features)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> JudgeFeatures:
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.judge.features(images)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def truth_targets(truth: Any) -> dict[str, int | None]:
    """Class indices ``{head: index or None}`` of one image's intended content, from a truth/prompt parquet row (JSON
    or parsed), an ``objects`` list or its JSON, or a flat dict of attribute names (any of
    ``{"colour": "red", "shape": "star", "position": "left", "count": 2, "background": "plain"}``)."""
    truth = _json(truth)
    out: dict[str, int | None] = dict.fromkeys(HEADS)
    if isinstance(truth, list):
        truth = {"objects": truth}
    if not isinstance(truth, Mapping):
        raise TypeError(f"cannot read a truth from {type(truth).__name__}")
    if "objects" in truth:
        objects = _json(truth["objects"])
        main = objects[int(truth.get("main_index", 0) or 0)]
        out["colour"] = COLOURS.index(main["colour"])
        out["shape"] = SHAPES.index(main["shape"])
        out["position"] = POSITIONS.index(main["position"]) if "position" in main else None
        out["count"] = COUNTS.index(str(len(objects)))
        bg = _json(truth.get("background"))
        if bg is not None:
            out["background"] = BACKGROUND_KINDS.index(bg["kind"] if isinstance(bg, Mapping) else bg)
        return out
    for name, labels in HEADS.items():
        value = truth.get(name)
        if value is not None:
            out[name] = labels.index(str(value))
    return out


def _targets_tensor(truths: Iterable[Any]) -> Tensor:
    """``(N, len(HEADS))`` long, -1 where an attribute is missing."""
    rows = [[-1 if t[name] is None else t[name] for name in HEADS] for t in map(truth_targets, truths)]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, len(HEADS))


@torch.no_grad()
def _predict(judge: nn.Module, images: Tensor, batch_size: int) -> dict[str, Tensor]:
    """Argmax per head of any module whose forward returns ``{head: logits}`` (heads it lacks are left out)."""
    preds: dict[str, list[Tensor]] = {}
    for i in range(0, images.shape[0], batch_size):
        for name, logits in judge(images[i : i + batch_size]).items():
            if name in HEADS:
                preds.setdefault(name, []).append(logits.argmax(-1).cpu())
    return {name: torch.cat(p) for name, p in preds.items()}


def _accuracies(preds: dict[str, Tensor], targets: Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    hits: dict[str, Tensor] = {}
    for k, name in enumerate(HEADS):
        t = targets[:, k]
        known = t >= 0
        if name in preds and known.any():
            hit = preds[name] == t
            hits[name] = hit | ~known
            out[name] = float(hit[known].float().mean())
    if "colour" in hits and "shape" in hits:
        known = (targets[:, 0] >= 0) & (targets[:, 1] >= 0)
        out["both"] = float((hits["colour"] & hits["shape"])[known].float().mean())
    return out


@torch.no_grad()
def judge_accuracy(
    judge: nn.Module, images: Tensor, truths: Sequence[Any], *, seed: int = 0, batch_size: int = 512
) -> dict[str, float]:
    """Share of images whose predicted attributes match their truths (:func:`truth_targets`), per head and ``both``
    (colour and shape), and ``chance/*`` against a seeded derangement of the truths (a judge that ignores the prompt).
    Heads missing from every truth or from the judge (any module returning ``{head: logits}``) are left out."""
    if len(truths) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(truths)} truths")
    targets = _targets_tensor(truths)
    preds = _predict(judge, images, batch_size)
    out = _accuracies(preds, targets)
    if len(truths) >= 2:
        chance = _accuracies(preds, targets[derangement(len(truths), (CHANCE_SEED_TAG, seed))])
        out.update({f"chance/{k}": v for k, v in chance.items()})
    out["n"] = len(truths)
    return out


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _to_tensor(arrays: Sequence[np.ndarray], size: int, chunk: int = 2048) -> Tensor:
    """``(H, W, 3)`` uint8 arrays -> uint8 ``(N, 3, size, size)``, shrunk as the judge shrinks its inputs, rounded."""
    out = []
    for i in range(0, len(arrays), chunk):
        x = torch.from_numpy(np.stack(arrays[i : i + chunk])).permute(0, 3, 1, 2)
        if x.shape[-1] != size:
            x = resize_images(x.float(), size).round_().clamp_(0, 255).to(torch.uint8)
        out.append(x.contiguous())
    return torch.cat(out)


def web_training_set(world_dir: str | Path, image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """Every successful web sample, in shard order: uint8 images ``(N, 3, S, S)`` and targets ``(N, len(HEADS))``."""
    world = Path(world_dir)
    columns = ["key", "status", *TRUTH_COLUMNS]
    truth = {r["key"]: r for r in pq.read_table(world / "truth/web.parquet", columns=columns).to_pylist()}
    images: list[np.ndarray] = []
    rows: list[dict] = []
    for shard in sorted((world / "web").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                row = truth.get(member.name.removesuffix(".jpg")) if member.name.endswith(".jpg") else None
                if row is not None and row["status"] == "success":
                    images.append(_decode(tar.extractfile(member).read()))
                    rows.append(row)
    if not images:
        raise FileNotFoundError(f"no web images with ground truth under {world / 'web'}")
    return _to_tensor(images, image_size), _targets_tensor(rows)


def heldout_set(world_dir: str | Path) -> tuple[Tensor, list[dict]]:
    """The ``eval/t2i_prompts`` reference images at full size (uint8) and their truth rows (image_id order)."""
    world = Path(world_dir)
    prompts = pq.read_table(world / "eval/t2i_prompts/prompts.parquet", columns=["image_id", "file_name", "objects"])
    truth_rows = pq.read_table(world / "truth/t2i_prompts.parquet", columns=["index", *TRUTH_COLUMNS])
    truth = {int(r["index"]): r for r in truth_rows.to_pylist()}
    images, rows = [], []
    for p in prompts.to_pylist():
        row = truth[int(p["image_id"])]
        if row["objects"] != p["objects"]:
            raise ValueError(f"prompts.parquet and truth/t2i_prompts.parquet disagree on image {p['image_id']}")
        images.append(_decode((world / "eval/t2i_prompts" / p["file_name"]).read_bytes()))
        rows.append(row)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), rows


def _augment(x: Tensor, t: Tensor, gen: torch.Generator, low_res_prob: float) -> tuple[Tensor, Tensor]:
    """Random h-flip (the position label flips with it) and, with ``low_res_prob``, a half-resolution round trip, so
    that 16-px generations are judged fairly."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    t = t.clone()
    k = list(HEADS).index("position")
    t[:, k] = torch.where(flip, torch.tensor(_FLIP_POSITION)[t[:, k]], t[:, k])
    if low_res_prob > 0 and x.shape[-1] >= 16:
        low = torch.rand(x.shape[0], generator=gen) < low_res_prob
        if low.any():
            side = x.shape[-1]
            x[low] = resize_images(resize_images(x[low], side // 2), side)
    return x, t


def save_judge(judge: AttributeJudge, out_dir: str | Path, info: dict) -> None:
    """Write ``judge.safetensors`` then ``judge.json`` (``info`` plus the architecture), each atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()}
    labels = {k: list(v) for k, v in HEADS.items()}
    meta = {"format": "tiny-world-judge", "recipe_version": RECIPE_VERSION, "config": judge.config(), "labels": labels}
    meta |= info
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(out / JSON_NAME, json.dumps(meta, indent=1) + "\n")


def load_judge(out_dir: str | Path, map_location: str | torch.device = "cpu") -> AttributeJudge:
    """The judge saved in ``out_dir`` (safetensors, no pickle), frozen in eval mode; ``judge.info`` is judge.json."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    meta = json.loads((out / JSON_NAME).read_text())
    if meta.get("format") != "tiny-world-judge":
        raise ValueError(f"{out / JSON_NAME} is not a tiny-world judge")
    if meta.get("labels") != {k: list(v) for k, v in HEADS.items()}:
        raise ValueError(f"{out / JSON_NAME} was saved with other label names than this code's")
    cfg = meta["config"]
    judge = AttributeJudge(image_size=cfg["image_size"], widths=cfg["widths"], pool=cfg["pool"])
    judge.load_state_dict(load_file(str(out / WEIGHTS_NAME), device=str(map_location)), strict=True)
    judge.info = meta
    return judge.to(map_location).freeze()


def train_judge(
    world_dir: str | Path,
    out_dir: str | Path,
    image_size: int = DEFAULT_IMAGE_SIZE,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int | None = None,
    *,
    weight_decay: float = 0.05,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    pool: str = "avgmax",
    low_res_prob: float = 0.25,
    warmup: int | None = None,
    device: str | torch.device = "cpu",
    log_every: int = 0,
    overwrite: bool = False,
) -> dict:
    """Train a judge on the world's web images (AdamW, linear warm-up then cosine), score it on ``eval/t2i_prompts``
    and save it to ``out_dir``; returns ``judge.json``'s content.

    ``heldout`` is the :func:`judge_accuracy` of the full-size reference images, ``heldout_16px`` that of the same
    images shrunk to 16 px (what a 16-px generator produces at best); None without ``eval/t2i_prompts``.
    ``threads`` sets torch's intra-op threads for the call. ``out_dir`` may hold a judge only with ``overwrite``.
    """
    world, out = Path(world_dir), Path(out_dir)
    if not overwrite and (out / JSON_NAME).exists():
        raise FileExistsError(f"{out} already holds a judge; pass overwrite=True (--overwrite) to replace it")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        t0 = time.perf_counter()
        images, targets = web_training_set(world, image_size)
        load_seconds = time.perf_counter() - t0
        n = images.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            judge = AttributeJudge(image_size=image_size, widths=widths, pool=pool)
        sample = images[: min(n, 4096)].float().div_(255.0)
        judge.mean.copy_(sample.mean(dim=(0, 2, 3)))
        judge.std.copy_(sample.std(dim=(0, 2, 3)).clamp_min(1e-3))
        judge = judge.to(device).train()
        decay = [p for p in judge.parameters() if p.ndim > 1]  # conv and linear weights; not biases, BatchNorm
        no_decay = [p for p in judge.parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
        )
        gen = torch.Generator().manual_seed(seed)
        warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
        order, cursor = torch.randperm(n, generator=gen), 0
        t1 = time.perf_counter()
        for step in range(steps):
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            x, t = _augment(images[idx].float().div_(255.0), targets[idx], gen, low_res_prob)
            x, t = x.to(device), t.to(device)
            progress = (step - warmup) / max(1, steps - warmup)
            step_lr = lr * (step + 1) / warmup if step < warmup else lr * 0.5 * (1.0 + math.cos(math.pi * progress))
            for group in opt.param_groups:
                group["lr"] = step_lr
            logits = judge(x)
            loss = sum(F.cross_entropy(logits[name], t[:, k], ignore_index=-1) for k, name in enumerate(HEADS))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log_every and (step % log_every == 0 or step == steps - 1):
                elapsed = time.perf_counter() - t1
                print(f"[world-judge] step {step + 1}/{steps} loss {loss:.4f} {elapsed:.1f}s", file=sys.stderr)
        train_seconds = time.perf_counter() - t1
        loss_value = float(loss.detach()) if steps else float("nan")
        judge.freeze()
        heldout = heldout_16 = None
        if (world / "eval/t2i_prompts/prompts.parquet").is_file():
            eval_images, eval_truths = heldout_set(world)
            heldout = judge_accuracy(judge, eval_images, eval_truths, seed=seed)
            small = resize_images(eval_images.float().div(255.0), 16)
            heldout_16 = judge_accuracy(judge, small, eval_truths, seed=seed)
        seed_of_world = json.loads((world / "world.json").read_text()).get("seed")
        world_info = {"path": str(world.resolve()), "seed": seed_of_world, "fingerprint": world_fingerprint(world)}
        recipe = dict(image_size=image_size, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay)
        recipe |= dict(warmup=warmup, schedule="linear warm-up + cosine", optimizer="AdamW")
        recipe |= dict(augment={"hflip": 0.5, "low_res_prob": low_res_prob}, seed=seed, threads=torch.get_num_threads())
        info = {"heldout": heldout, "heldout_16px": heldout_16, "heldout_set": "eval/t2i_prompts"}
        info |= {"world": world_info | {"n_train": n}, "recipe": recipe | {"device": str(device)}}
        info |= {"final_loss": loss_value, "params": sum(p.numel() for p in judge.parameters())}
        seconds = {"load": load_seconds, "train": train_seconds, "total": time.perf_counter() - t0}
        info |= {f"{k}_seconds": round(v, 2) for k, v in seconds.items()}
        save_judge(judge.cpu(), out, info)
        return json.loads((out / JSON_NAME).read_text())
    finally:
        torch.set_num_threads(old_threads)


def main(argv: list[str] | None = None) -> dict:
    """``python -m experiments world-judge --world DIR --out DIR [--image-size 32] [--steps N] ...``."""
    # Flags left out are not passed, so train_judge's defaults apply.
    ap = argparse.ArgumentParser(prog="world-judge", description=__doc__, argument_default=argparse.SUPPRESS)
    ap.add_argument("--world", dest="world_dir", required=True, help="tiny world directory (generate_world output)")
    ap.add_argument("--out", dest="out_dir", required=True, help="output directory (judge.safetensors + judge.json)")
    for flag in ("image-size", "steps", "batch-size", "seed", "threads"):
        ap.add_argument(f"--{flag}", type=int)
    for flag in ("lr", "weight-decay", "low-res-prob"):
        ap.add_argument(f"--{flag}", type=float)
    ap.add_argument("--device")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--overwrite", action="store_true", help="replace a judge already in --out")
    a = vars(ap.parse_args(argv))
    summary = train_judge(**a)
    print(json.dumps({"out": str(a["out_dir"]), **summary}, indent=1))
    return summary
