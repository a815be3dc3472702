"""Loader throughput: our ``CaptionMixDataModule`` against open_clip's own webdataset training pipeline.

Both loaders read the SAME img2dataset shards with the same number of workers, batch size, image transform
(``open_clip.image_transform(size, is_train=True)``), tokenizer (open_clip's ``SimpleTokenizer``, context 77) and
shuffle settings (open_clip's train pipeline: sample shuffle buffer 5000, initial 1000; shard order shuffled per
epoch -- open_clip's 2000-slot shard buffer is a full permutation for <= 2000 shards, as is ours). Our side uses one
caption source (``{"original": "txt"}``), i.e. the same text open_clip reads.

Each run builds a fresh loader (fresh workers), takes the time to the first batch (worker start-up + filling the
shuffle buffer's first 1000 samples), skips ``--warmup-batches`` more, then times ``--samples`` samples
(``time.perf_counter``). Runs alternate between the two loaders (``ours, open_clip, open_clip, ours, ...``); the
table shows the median and min/max samples/s over ``--repeats`` runs and the ratio ours / open_clip (goal >= 1).

    python -m benchmarks.loader                            # generates a 20k-sample tiny world in a temp dir
    python -m benchmarks.loader --shards 'data/world/web/{00000..00019}.tar' --workers 2 --batch-size 256
    python -m benchmarks.loader --stored-size 384 --world-samples 8000 --world-dir /tmp/w384 --image-size 112
    python -m benchmarks.loader --profile 4096             # cProfile both pipelines in-process (num_workers=0)

Targets and history: the paired-ratio goals per image size are :data:`TARGETS` (the table says whether a run met
its goal; ``--check`` exits with status 1 when not). ``--record`` appends the run's figures, open_clip's beside them,
the goal, the commit and the machine to ``benchmarks/history/loader.jsonl`` (committed, so a regression shows next to
the runs before it); ``--history`` prints that file as a table.

    python -m benchmarks.loader --shards 'data/world/web/{00000..00019}.tar' --record
    python -m benchmarks.loader --history

Shards: ``--shards PATTERN`` (brace pattern, glob, ``::`` list or directory); by default the web split of the tiny
world (``datamodules.tiny_world.generate_world``, 20 shards x 1000 samples of 64x64 JPEGs) is generated into a
temporary directory (``--world-dir`` keeps/reuses it). ``--stored-size S`` generates it with S-px images instead
(scene geometry scaled with S), e.g. 384 like DataComp downloads (img2dataset keeps the largest side <= 512): our
loader decodes such JPEGs at a reduced DCT scale when the transform's target is small (``wds_stages.DecodeImage``),
which 64-px images are too small for. ``--full-decode`` turns that off on our side, for an A/B.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# open_clip_train/data.py's training-pipeline constants; our loader is given the same sample-buffer sizes.
OPEN_CLIP_SAMPLE_SHUFFLE_SIZE = 5000
OPEN_CLIP_SAMPLE_SHUFFLE_INITIAL = 1000
LOADERS = ("ours", "open_clip")
TARGETS = {64: 1.2, 112: 1.3, 224: 1.0}
"""Goal for the median paired ratio ours / open_clip per ``--image-size`` (64 px from the tiny world's 64-px JPEGs;
112 and 224 px from 384-px JPEGs, ``--stored-size 384``). Speed goals live here, never in timed unit tests."""
HISTORY = Path(__file__).resolve().parent / "history" / "loader.jsonl"


# ------------------------------------------------------------------------------------------------------------ shards
def _pattern_of(web_dir: Path) -> str:
    tars = sorted(web_dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar in {web_dir}")
    return str(web_dir / f"{{{tars[0].stem}..{tars[-1].stem}}}.tar")


def scene_config(stored_size: int):
    """The tiny world's scene at ``stored_size`` px: every length scaled from the 64-px default (so the images show
    the same scenes, only sharper), drawn at >= 256 px before downsampling."""
    from datamodules.tiny_world.scene import SceneConfig

    f = stored_size / 64
    base = SceneConfig()
    return SceneConfig(
        image_size=stored_size, supersample=max(1, round(base.supersample / f)), small_size=base.small_size * f,
        large_size=base.large_size * f, position_jitter=base.position_jitter * f, edge_margin=base.edge_margin * f,
        stripe_width=max(1, round(base.stripe_width * f)),
    )  # fmt: skip


def default_shards(
    world_dir: Path, n_samples: int, shard_size: int, seed: int = 0, stored_size: int = 64
) -> tuple[str, str]:
    """Shards to benchmark on: the tiny world's web split under ``world_dir`` with ``stored_size``-px images (reused
    if already there, generated otherwise). Returns ``(pattern, how)``."""
    web = world_dir / "web"
    if web.is_dir() and any(web.glob("*.tar")):
        meta = world_dir / "world.json"
        have = json.loads(meta.read_text())["config"]["scene"]["image_size"] if meta.is_file() else None
        if have != stored_size:
            raise ValueError(f"{world_dir} holds a world with {have}-px images, not {stored_size}; use another dir")
        return _pattern_of(web), f"reused {web}"
    from datamodules.tiny_world import WorldConfig, generate_world

    t0 = time.perf_counter()
    cfg = WorldConfig(
        seed=seed, n_web=n_samples, shard_size=shard_size, n_caption_pretrain=0, n_instruct=0, n_classify=0,
        n_retrieval=0, n_long_retrieval=0, n_t2i=0, workers=max(1, min(4, os.cpu_count() or 1)),
        scene=scene_config(stored_size),
    )  # fmt: skip
    generate_world(world_dir, cfg)
    return _pattern_of(web), f"tiny world web split generated in {time.perf_counter() - t0:.1f} s"


def mean_image_bytes(url: str, limit: int = 200) -> tuple[float, tuple[int, int] | None]:
    """Mean encoded size of the first ``limit`` images of a shard, and the size of the first one."""
    from PIL import Image

    from datamodules.wds_stages import IMAGE_MEMBERS, iter_tar_members, open_shard

    sizes, first = [], None
    stream = open_shard(url)
    try:
        for name, data in iter_tar_members(stream, url):
            if name.rsplit(".", 1)[-1].lower() in IMAGE_MEMBERS:
                first = first or Image.open(io.BytesIO(data)).size
                sizes.append(len(data))
                if len(sizes) >= limit:
                    break
    finally:
        stream.close()
    return (statistics.mean(sizes) if sizes else 0.0), first


# ----------------------------------------------------------------------------------------------------------- loaders
def _transforms(image_size: int) -> tuple[Callable, Callable]:
    import open_clip

    return open_clip.image_transform(image_size, is_train=True), open_clip.get_tokenizer("ViT-B-32")


class FullDecode:
    """The image transform behind a plain callable: ``DecodeImage`` cannot see its resize step, so it decodes every
    image at full size (``--full-decode``: the A/B of reduced-scale decoding)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, img: Any) -> Any:
        return self.transform(img)


def build_ours(urls: Sequence[str], cfg: SimpleNamespace, epoch_samples: int, workers: int) -> Iterable:
    """``CaptionMixDataModule.train_dataloader()`` with open_clip's transform, tokenizer and buffer sizes."""
    from datamodules.caption_mix import CaptionMixDataModule
    from lightning_modules.components.clip_model import TokenizeOne

    image_tf, tokenizer = _transforms(cfg.image_size)
    if getattr(cfg, "full_decode", False):
        image_tf = FullDecode(image_tf)
    dm = CaptionMixDataModule(
        train_shards=list(urls),
        batch_size=cfg.batch_size,
        sources={"original": "txt"},
        num_workers=workers,
        train_num_samples=epoch_samples,
        shuffle_buffer=cfg.shuffle_buffer,
        shuffle_initial=cfg.shuffle_initial,
        seed=cfg.seed,
        image_transform=image_tf,
        text_transform=TokenizeOne(tokenizer),
    )
    loader = dm.train_dataloader()
    loader.set_epoch(0)
    return loader


def tarfile_to_samples_nothrow_eof_none(src, handler=None):
    """open_clip's ``tarfile_to_samples_nothrow`` with ``tar_file_expander(..., eof_value=None)``.

    webdataset >= 0.2.96 (we pin 1.0.x) ends every shard with an EOF marker ``{}`` that open_clip_train 3.3's
    ``group_by_keys_nothrow`` does not expect (``KeyError: 'fname'``; webdataset issue #384, open_clip issue #935,
    fix suggested there: ``eof_value=None``). With ``eof_value=None`` the stream is exactly what open_clip was
    written against; the work per sample is unchanged.
    """
    from open_clip_train import data as oc_data
    from webdataset.tariterators import tar_file_expander, url_opener

    handler = handler or oc_data.log_and_continue
    streams = url_opener(src, handler=handler)
    files = tar_file_expander(streams, handler=handler, eof_value=None)
    return oc_data.group_by_keys_nothrow(files, handler=handler)


def _open_clip_needs_eof_patch() -> bool:
    import inspect

    from open_clip_train import data as oc_data
    from webdataset.tariterators import tar_file_expander

    has_eof = "eof_value" in inspect.signature(tar_file_expander).parameters
    return has_eof and "eof_value" not in inspect.getsource(oc_data.tarfile_to_samples_nothrow)


def build_open_clip(urls: Sequence[str], cfg: SimpleNamespace, epoch_samples: int, workers: int) -> Iterable:
    """``open_clip_train.data.get_wds_dataset(..., is_train=True).dataloader`` (its own shuffle constants)."""
    from open_clip_train import data as oc_data

    image_tf, tokenizer = _transforms(cfg.image_size)
    args = SimpleNamespace(
        train_data="::".join(urls),  # open_clip expands "::" lists and braces, not python lists
        val_data=None,
        train_num_samples=epoch_samples,
        val_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        batch_size=cfg.batch_size,
        workers=workers,
        world_size=1,
        seed=cfg.seed,
    )
    original = oc_data.tarfile_to_samples_nothrow
    if _open_clip_needs_eof_patch():  # the pipeline list picks the function up when it is built, so patch briefly
        oc_data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow_eof_none
    try:
        info = oc_data.get_wds_dataset(args, image_tf, is_train=True, epoch=0, floor=False, tokenizer=tokenizer)
    finally:
        oc_data.tarfile_to_samples_nothrow = original
    return info.dataloader


def _import_both() -> None:
    import open_clip  # noqa: F401
    import open_clip_train.data  # noqa: F401

    import datamodules.caption_mix  # noqa: F401
    import lightning_modules.components.clip_model  # noqa: F401


BUILDERS: dict[str, Callable[..., Iterable]] = {"ours": build_ours, "open_clip": build_open_clip}


def _images_texts(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, dict):  # ours
        return batch["image"], batch["text"]
    return batch[0], batch[1]  # open_clip: (images, texts)


def epoch_batches(cfg: SimpleNamespace) -> int:
    """Batches per loader epoch: warm-up + timed batches, rounded up to a multiple of the worker count so that both
    loaders' epoch arithmetic (ours: floor over workers, open_clip: ceil per worker) gives exactly this many."""
    w = max(1, cfg.workers)
    timed = math.ceil(cfg.samples / cfg.batch_size)
    return math.ceil((1 + cfg.warmup_batches + timed) / w) * w


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its reaped children (loader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(name: str, urls: Sequence[str], cfg: SimpleNamespace) -> dict[str, Any]:
    """One run: build a fresh loader, time the first batch, skip the warm-up, time every remaining batch.

    Also measures the CPU time of the whole run (main process + workers, reaped at the end) per delivered sample:
    on a small shared machine this is steadier than wall-clock throughput.
    """
    n_batches = epoch_batches(cfg)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    loader = BUILDERS[name](urls, cfg, n_batches * cfg.batch_size, cfg.workers)
    it = iter(loader)
    images, texts = _images_texts(next(it))
    first_batch_s = time.perf_counter() - t0
    shapes = {"image": list(images.shape), "text": list(texts.shape)}
    delivered = len(images)
    for _ in range(cfg.warmup_batches):
        delivered += len(_images_texts(next(it))[0])
    samples, t1 = 0, time.perf_counter()
    for batch in it:
        samples += len(_images_texts(batch)[0])
    seconds = time.perf_counter() - t1
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # join (and so reap) the workers now, before the other loader starts and before reading rusage
    del it, loader
    gc.collect()
    cpu = _cpu_seconds() - cpu0
    delivered += samples
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds > 0 else float("inf"),
        "first_batch_s": first_batch_s,
        "batches": n_batches,
        "cpu_s": cpu,
        "cpu_ms_per_sample": 1000 * cpu / delivered,
        "shapes": shapes,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    rates = [r["samples_per_s"] for r in runs]
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "first_batch_s": statistics.median(r["first_batch_s"] for r in runs),
        "cpu_ms_per_sample": statistics.median(r["cpu_ms_per_sample"] for r in runs),
        "timed_samples_per_run": runs[0]["samples"],
    }


def format_table(result: dict[str, Any]) -> str:
    header = ("loader", "samples/s (median)", "min", "max", "first batch s", "CPU ms/sample")
    rows = [header] + [
        (name, f"{s['median']:.0f}", f"{s['min']:.0f}", f"{s['max']:.0f}", f"{s['first_batch_s']:.2f}",
         f"{s['cpu_ms_per_sample']:.3f}")
        for name, s in result["summary"].items()
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append(" | ".join(cells))
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append(f"ratio (ours/open_clip): {result['ratio']:.2f}")
    if "paired_ratios" in result:
        per_run = ", ".join(f"{r:.2f}" for r in result["paired_ratios"])
        lines.append(f"paired ratio per repeat: {per_run} (median {result['paired_ratio_median']:.2f})")
    if "cpu_ratio" in result:
        lines.append(f"CPU per sample, open_clip/ours: {result['cpu_ratio']:.2f} (> 1: ours does less work)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- profile
def profile_loader(name: str, urls: Sequence[str], cfg: SimpleNamespace, samples: int, top: int = 25) -> str:
    """cProfile one loader in-process (num_workers=0) over ``samples`` samples after its first batch.

    Runs with one torch thread, as in a loader worker (torch sets 1 per worker): with torch's default of one thread
    per core, small per-sample ops (``ToTensor``'s ``contiguous``) wait on thread barriers and, on a busy machine,
    took 30 ms instead of 0.1 ms, which hid everything else in the profile.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = BUILDERS[name](urls, cfg, (math.ceil(samples / cfg.batch_size) + 2) * cfg.batch_size, 0)
        if hasattr(getattr(loader, "dataset", None), "restore_rngs"):
            loader.dataset.restore_rngs = False  # ours: profile what a loader worker runs (no RNG save/restore)
        it = iter(loader)
        next(it)
        prof, n = cProfile.Profile(), 0
        t0 = time.perf_counter()
        prof.enable()
        while n < samples:
            n += len(_images_texts(next(it))[0])
        prof.disable()
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    out = io.StringIO()
    out.write(f"== {name}: {n} samples in {dt:.2f} s under cProfile ({n / dt:.0f} samples/s, num_workers=0)\n")
    st = pstats.Stats(prof, stream=out).strip_dirs()
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# ------------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loader", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", help="shard pattern to read (default: generate the tiny world's web split)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (both loaders)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64, help="open_clip image_transform size (64, 112, 224)")
    p.add_argument("--stored-size", type=int, default=64, help="side of the generated world's stored images")
    p.add_argument("--full-decode", action="store_true", help="ours: no reduced-scale JPEG decoding (A/B)")
    p.add_argument("--samples", type=int, default=40_000, help="timed samples per run (default: 2 passes over 20k)")
    p.add_argument("--repeats", type=int, default=3, help="runs per loader, alternating the two")
    p.add_argument("--warmup-batches", type=int, default=None, help="batches after the first one left out of the "
                   "timing (default: 2 x workers, at least 2)")  # fmt: skip
    p.add_argument("--shuffle-buffer", type=int, default=OPEN_CLIP_SAMPLE_SHUFFLE_SIZE,
                   help="our sample shuffle buffer (open_clip's is fixed at 5000)")  # fmt: skip
    p.add_argument("--shuffle-initial", type=int, default=OPEN_CLIP_SAMPLE_SHUFFLE_INITIAL,
                   help="our initial buffer fill (open_clip's is fixed at 1000)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-dir", help="where the default shards are generated (reused when present); default: a "
                   "temporary directory, deleted afterwards")  # fmt: skip
    p.add_argument("--world-samples", type=int, default=20_000, help="web samples of the generated world")
    p.add_argument("--shard-size", type=int, default=1_000, help="samples per generated shard")
    p.add_argument("--json", help="write the full result (every run) to this file")
    p.add_argument(
        "--record",
        nargs="?",
        const=str(HISTORY),
        default=None,
        metavar="FILE",
        help=f"append the summary to the history (default {HISTORY.relative_to(HISTORY.parents[2])})",
    )
    p.add_argument("--check", action="store_true", help="exit with status 1 when the run misses its TARGETS goal")
    p.add_argument("--history", nargs="?", const=str(HISTORY), default=None, metavar="FILE",
                   help="print the recorded history as a table and exit")  # fmt: skip
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="instead of timing, cProfile N samples of each loader in-process (num_workers=0)")  # fmt: skip
    a = p.parse_args(argv)
    if a.warmup_batches is None:
        a.warmup_batches = max(2, 2 * a.workers)
    for k in ("batch_size", "samples", "repeats", "shuffle_buffer", "shuffle_initial"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if a.workers < 0 or a.warmup_batches < 0:
        p.error("--workers and --warmup-batches must be >= 0")
    if a.stored_size < 16:
        p.error("--stored-size must be >= 16")
    return a


def _git(*args: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                             timeout=30, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


LOADER_FILES = ("datamodules/caption_mix.py", "datamodules/wds_stages.py", "benchmarks/loader.py")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "torchvision", "pillow", "webdataset", "open_clip_torch"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def history_entry(result: dict[str, Any], a: argparse.Namespace, load_before: tuple[float, ...] | None) -> dict:
    """One line of ``benchmarks/history/loader.jsonl``: figures beside open_clip's, goal, commit, machine."""
    import datetime

    s = result["summary"]
    dirty = _git("status", "--porcelain", "--", *LOADER_FILES)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "loader_files_modified": bool(dirty) if dirty is not None else None,
        "image_size": a.image_size,
        "stored": result["settings"].get("stored"),
        "settings": {k: result["settings"][k] for k in ("workers", "batch_size", "samples", "warmup_batches",
                                                         "shuffle_buffer", "shuffle_initial", "full_decode")},
        "repeats": a.repeats,
        "shards": result["shards"],
        "ours": {k: round(s["ours"][k], 3) for k in ("median", "min", "max", "cpu_ms_per_sample")},
        "open_clip": {k: round(s["open_clip"][k], 3) for k in ("median", "min", "max", "cpu_ms_per_sample")},
        "ratio": round(result["ratio"], 3),
        "paired_ratios": [round(r, 3) for r in result["paired_ratios"]],
        "paired_ratio_median": round(result["paired_ratio_median"], 3),
        "cpu_ratio": round(result["cpu_ratio"], 3),
        "target": result.get("target"),
        "machine": {**result["machine"], "load_before": load_before, "load_after": _loadavg(), **_versions()},
    }  # fmt: skip


def _loadavg() -> tuple[float, ...] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def format_history(path: str) -> str:
    """The history file as a Markdown table, oldest first."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    head = "| date | commit | px (stored) | ours samples/s | open_clip | paired ratios (median) | CPU ratio | goal |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        stored = f"{r['stored'][0]}" if r.get("stored") else "?"
        goal = r.get("target") or {}
        met = ("met" if goal.get("met") else "NOT met") if goal else ""
        paired = ", ".join(f"{x:.2f}" for x in r["paired_ratios"])
        lines.append(
            f"| {r['date'][:16]} | {r['commit']}{'+' if r.get('loader_files_modified') else ''} | {r['image_size']} "
            f"({stored}) | {r['ours']['median']:.0f} | {r['open_clip']['median']:.0f} | {paired} "
            f"({r['paired_ratio_median']:.2f}) | {r['cpu_ratio']:.2f} | "
            f">= {goal.get('paired_ratio_median_at_least', '-')} {met} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and return the result (``summary``, ``runs``, ``ratio``, settings)."""
    a = parse_args(argv)
    if a.history:
        print(format_history(a.history))
        return {"history": a.history}
    load_before = _loadavg()
    from datamodules.caption_mix import expand_urls

    tmp: str | None = None
    try:
        if a.shards:
            pattern, how = a.shards, "given"
        else:
            world = Path(a.world_dir) if a.world_dir else Path(tmp := tempfile.mkdtemp(prefix="bench-loader-"))
            pattern, how = default_shards(world, a.world_samples, a.shard_size, a.seed, a.stored_size)
        urls = expand_urls(pattern)
        cfg = SimpleNamespace(**{k: getattr(a, k) for k in ("workers", "batch_size", "image_size", "samples",
                                                             "warmup_batches", "shuffle_buffer", "shuffle_initial",
                                                             "seed", "full_decode")})  # fmt: skip
        image_bytes, stored = mean_image_bytes(urls[0])
        cfg.stored = list(stored) if stored else None
        cfg.mean_image_kb = round(image_bytes / 1024, 1)
        print(f"shards: {pattern} ({len(urls)} shards, {how}); stored images {stored} px, "
              f"{cfg.mean_image_kb} KB each", flush=True)  # fmt: skip
        if a.profile:
            for name in LOADERS:
                print(profile_loader(name, urls, cfg, a.profile), flush=True)
            return {"profile": True, "shards": pattern}
        print(
            f"workers {a.workers} | batch {a.batch_size} | image {a.image_size}px"
            f"{' (ours: full-size decode)' if a.full_decode else ''} | {a.samples} timed samples/run "
            f"after {1 + a.warmup_batches} warm-up batches | {a.repeats} runs each | shuffle {a.shuffle_buffer}/"
            f"{a.shuffle_initial} | {os.cpu_count()} CPUs",
            flush=True,
        )
        _import_both()  # so neither side's first run pays for imports (lightning, open_clip_train)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in LOADERS}
        for r in range(a.repeats):
            for name in LOADERS if r % 2 == 0 else tuple(reversed(LOADERS)):
                run = time_loader(name, urls, cfg)
                runs[name].append(run)
                print(f"  run {r + 1}/{a.repeats} {name:<9} {run['samples_per_s']:8.0f} samples/s "
                      f"({run['samples']} in {run['seconds']:.2f} s, first batch {run['first_batch_s']:.2f} s, "
                      f"{run['cpu_ms_per_sample']:.3f} CPU ms/sample)", flush=True)  # fmt: skip
        summary = {name: summarize(runs[name]) for name in LOADERS}
        # Runs r of both loaders are back to back, so their ratio cancels slow drifts of a shared machine.
        paired = [o["samples_per_s"] / c["samples_per_s"] for o, c in zip(runs["ours"], runs["open_clip"], strict=True)]
        result = {
            "shards": pattern,
            "num_shards": len(urls),
            "settings": vars(cfg),
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
            "runs": runs,
            "summary": summary,
            "ratio": summary["ours"]["median"] / summary["open_clip"]["median"],
            "paired_ratios": paired,
            "paired_ratio_median": statistics.median(paired),
            "cpu_ratio": summary["open_clip"]["cpu_ms_per_sample"] / summary["ours"]["cpu_ms_per_sample"],
        }
        target = TARGETS.get(a.image_size)
        if target is not None:
            result["target"] = {"paired_ratio_median_at_least": target, "met": result["paired_ratio_median"] >= target}
        print(format_table(result), flush=True)
        if target is not None:
            print(f"goal: paired ratio >= {target} at {a.image_size} px: "
                  f"{'met' if result['target']['met'] else 'NOT met'}", flush=True)  # fmt: skip
        if a.record:
            entry = history_entry(result, a, load_before)
            with open(a.record, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            print(f"recorded in {a.record}", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2))
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _result = main()
    if "--check" in sys.argv[1:] and not _result.get("target", {}).get("met", True):
        sys.exit(1)
