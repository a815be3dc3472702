"""Loader throughput at several image sizes in one run: our ``CaptionMixDataModule`` with its own tar reader
(``ours``), the same loader with webdataset's tar reading (``ours_wds_tar``) and open_clip's training pipeline
(``open_clip``: the stages of ``open_clip_train.data.get_wds_dataset(..., is_train=True)``, built here with
webdataset 1.0). All three read the same shards with the same workers, batch size, image transform, tokenizer, sample
shuffle buffer and epoch length; each run builds a fresh loader, and the loaders take turns. What is held equal, how
it is timed, the goals (:data:`TARGETS`) and the figures: ``benchmarks/README.md``.

    python -m benchmarks.loader --world-dir /tmp/w384 --stored-size 384 --world-samples 4000 --samples 4096 --record
    python -m benchmarks.loader --shards 'data/world/web/{00000..00019}.tar' --image-size 64
    python -m benchmarks.loader --profile 4096      # cProfile each loader in-process (num_workers=0) instead
    python -m benchmarks.loader --history           # the recorded runs as a table
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import gc
import io
import json
import math
import os
import pstats
import random
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from benchmarks.common import commit, git, loadavg, machine, parser, quiet, record, summarize, write_json

OPEN_CLIP_SAMPLE_SHUFFLE_SIZE = 5000  # open_clip_train/data.py's training-pipeline constants
OPEN_CLIP_SAMPLE_SHUFFLE_INITIAL = 1000
LOADERS = ("ours", "ours_wds_tar", "open_clip")
TARGETS = {64: 1.2, 112: 1.3, 224: 1.0}
"""Goal for the median paired ratio ours / open_clip per image size. Speed goals live here, never in timed tests."""
HISTORY = Path(__file__).resolve().parent / "history" / "loader.jsonl"
LOADER_FILES = ("datamodules/caption_mix.py", "datamodules/wds_stages.py", "benchmarks/loader.py")


# ------------------------------------------------------------------------------------------------------------ shards
def scene_config(stored_size: int):
    """The tiny world's scene at ``stored_size`` px: every length scaled from the 64-px default (so the images show
    the same scenes, only sharper), drawn at >= 256 px before downsampling."""
    from datamodules.tiny_world.scene import SceneConfig

    f, base = stored_size / 64, SceneConfig()
    lengths = {k: getattr(base, k) * f for k in ("small_size", "large_size", "position_jitter", "edge_margin")}
    supersample, stripe_width = max(1, round(base.supersample / f)), max(1, round(base.stripe_width * f))
    return replace(base, image_size=stored_size, supersample=supersample, stripe_width=stripe_width, **lengths)


def default_shards(world_dir: Path, n_samples: int, shard_size: int, seed: int = 0, stored_size: int = 64):
    """The tiny world's web split under ``world_dir`` with ``stored_size``-px images (reused if there, generated
    otherwise). Returns ``(pattern, how)``."""
    web = world_dir / "web"
    how = f"reused {web}"
    if not (web.is_dir() and any(web.glob("*.tar"))):
        from datamodules.tiny_world import WorldConfig, generate_world

        t0 = time.perf_counter()
        splits = ("caption_pretrain", "instruct", "classify", "retrieval", "long_retrieval", "vg_attribution", "t2i")
        counts = {f"n_{split}": 0 for split in splits}
        workers = max(1, min(4, os.cpu_count() or 1))
        scene = scene_config(stored_size)
        generate_world(
            world_dir,
            WorldConfig(seed=seed, n_web=n_samples, shard_size=shard_size, workers=workers, scene=scene, **counts),
        )
        how = f"tiny world web split generated in {time.perf_counter() - t0:.1f} s"
    meta = world_dir / "world.json"
    have = json.loads(meta.read_text())["config"]["scene"]["image_size"] if meta.is_file() else None
    if have != stored_size:
        raise ValueError(f"{world_dir} holds a world with {have}-px images, not {stored_size}; use another dir")
    tars = sorted(web.glob("*.tar"))
    return str(web / f"{{{tars[0].stem}..{tars[-1].stem}}}.tar"), how


def first_image(url: str) -> tuple[float, list[int]]:
    """Mean encoded size (KB) of a shard's images and the size of its first one."""
    from PIL import Image

    with tarfile.open(url) as tar:
        images = [m for m in tar.getmembers() if m.name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png", "webp")]
        size = Image.open(io.BytesIO(tar.extractfile(images[0]).read())).size
    return round(statistics.mean(m.size for m in images) / 1024, 1), list(size)


# ----------------------------------------------------------------------------------------------------------- loaders
@dataclass
class FullDecode:
    """The image transform behind a plain callable: ``DecodeImage`` cannot see its resize step, so it decodes every
    image at full size (``--full-decode``: the A/B of reduced-scale decoding)."""

    transform: Callable

    def __call__(self, img: Any) -> Any:
        return self.transform(img)


def _transforms(image_size: int) -> tuple[Callable, Callable]:
    import open_clip

    from lightning_modules.components.clip_model import TokenizeOne

    image_tf = open_clip.image_transform(image_size, is_train=True)
    return image_tf, TokenizeOne(open_clip.get_tokenizer("ViT-B-32"))


def build_ours(urls: Sequence[str], cfg: SimpleNamespace, samples: int, workers: int, tar_reader: str = "own"):
    """``CaptionMixDataModule.train_dataloader()`` with open_clip's transform, tokenizer and buffer sizes."""
    from datamodules.caption_mix import CaptionMixDataModule

    image_tf, tokenize = _transforms(cfg.image_size)
    dm = CaptionMixDataModule(
        train_shards=list(urls),
        batch_size=cfg.batch_size,
        sources={"original": "txt"},
        num_workers=workers,
        train_num_samples=samples,
        shuffle_buffer=cfg.shuffle_buffer,
        shuffle_initial=cfg.shuffle_initial,
        seed=cfg.seed,
        image_transform=FullDecode(image_tf) if cfg.full_decode else image_tf,
        text_transform=tokenize,
    )
    dm.settings.tar_reader = tar_reader
    loader = dm.train_dataloader()
    loader.set_epoch(0)
    return loader


def _has_image_and_text(sample: dict) -> bool:  # open_clip's filter_no_caption_or_no_image
    return "txt" in sample and any(k in sample for k in ("png", "jpg", "jpeg", "webp"))


def build_open_clip(urls: Sequence[str], cfg: SimpleNamespace, samples: int, workers: int):
    """open_clip's ``get_wds_dataset(args, preprocess, is_train=True, epoch=0)`` training pipeline, stage by stage."""
    import webdataset as wds

    image_tf, tokenize = _transforms(cfg.image_size)
    pipeline = [
        wds.SimpleShardList(list(urls)),
        wds.detshuffle(bufsize=2000, initial=500, seed=cfg.seed, epoch=0),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(OPEN_CLIP_SAMPLE_SHUFFLE_SIZE, OPEN_CLIP_SAMPLE_SHUFFLE_INITIAL, rng=random.Random(cfg.seed)),
        wds.select(_has_image_and_text),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=image_tf, text=tokenize),
        wds.to_tuple("image", "text"),
        wds.batched(cfg.batch_size, partial=False),
    ]
    batches = math.ceil(samples / cfg.batch_size / max(1, workers))  # per worker, as open_clip's with_epoch
    dataset = wds.DataPipeline(*pipeline).with_epoch(batches)
    return wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=workers > 0)


BUILDERS: dict[str, Callable[..., Iterable]] = {
    "ours": build_ours,
    "ours_wds_tar": lambda *a: build_ours(*a, tar_reader="webdataset"),
    "open_clip": build_open_clip,
}


def _images(batch: Any) -> Any:
    return batch["image"] if isinstance(batch, dict) else batch[0]


def epoch_batches(cfg: SimpleNamespace) -> int:
    """Batches per loader epoch: first + warm-up + timed batches, rounded up to a multiple of the workers so that
    every loader's epoch arithmetic gives exactly this many."""
    w = max(1, cfg.workers)
    return math.ceil((1 + cfg.warmup_batches + math.ceil(cfg.samples / cfg.batch_size)) / w) * w


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(name: str, urls: Sequence[str], cfg: SimpleNamespace) -> dict[str, Any]:
    """One run: build a fresh loader, time the first batch, skip the warm-up, time every remaining batch."""
    n_batches = epoch_batches(cfg)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    it = iter(BUILDERS[name](urls, cfg, n_batches * cfg.batch_size, cfg.workers))
    first = next(it)
    first_batch_s = time.perf_counter() - t0
    texts = first["text"] if isinstance(first, dict) else first[1]
    shapes = {"image": list(_images(first).shape), "text": list(texts.shape)}
    delivered = len(_images(first)) + sum(len(_images(next(it))) for _ in range(cfg.warmup_batches))
    samples, t1 = 0, time.perf_counter()
    for batch in it:
        samples += len(_images(batch))
    seconds = time.perf_counter() - t1
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()  # reap the workers now, before the next loader starts and before reading rusage
    del it
    gc.collect()
    cpu = _cpu_seconds() - cpu0
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds > 0 else float("inf"),
        "first_batch_s": first_batch_s,
        "cpu_ms_per_sample": 1000 * cpu / (delivered + samples),
        "shapes": shapes,
    }


def measure_size(urls: Sequence[str], cfg: SimpleNamespace, repeats: int) -> dict[str, Any]:
    """All loaders at ``cfg.image_size``, ``repeats`` runs each, in turns."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in LOADERS}
    for r in range(repeats):
        for name in LOADERS[r % len(LOADERS) :] + LOADERS[: r % len(LOADERS)]:
            run = time_loader(name, urls, cfg)
            runs[name].append(run)
            rate, first, cpu = run["samples_per_s"], run["first_batch_s"], run["cpu_ms_per_sample"]
            where = f"{cfg.image_size} px run {r + 1}/{repeats} {name:<12}"
            print(f"  {where} {rate:8.0f} samples/s (first batch {first:.2f} s, {cpu:.3f} CPU ms/sample)", flush=True)
    medians = ("first_batch_s", "cpu_ms_per_sample")
    summary = {name: summarize(runs[name], "samples_per_s", medians) for name in LOADERS}
    paired = [o["samples_per_s"] / c["samples_per_s"] for o, c in zip(runs["ours"], runs["open_clip"], strict=True)]
    result = {
        "runs": runs,
        "summary": summary,
        "ratio": summary["ours"]["median"] / summary["open_clip"]["median"],
        "paired_ratios": paired,
        "paired_ratio_median": statistics.median(paired),
        "own_tar_gain": summary["ours"]["median"] / summary["ours_wds_tar"]["median"] - 1,
    }
    if cfg.image_size in TARGETS:
        goal = TARGETS[cfg.image_size]
        result["target"] = {"paired_ratio_median_at_least": goal, "met": result["paired_ratio_median"] >= goal}
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = []
    for size, r in result["sizes"].items():
        for name, s in r["summary"].items():
            ratio = s["median"] / r["summary"]["open_clip"]["median"]
            rows.append({"px": size, "loader": name, **{k: round(v, 3) for k, v in s.items()}, "vs open_clip": ratio})
    table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f")
    lines = [table]
    for size, r in result["sizes"].items():
        goal = r.get("target")
        lines.append(
            f"{size} px: ratio (ours/open_clip): {r['ratio']:.2f}, paired {r['paired_ratio_median']:.2f}; "
            f"own tar reader vs webdataset's: {100 * r['own_tar_gain']:+.1f}%"
            + (f"; goal >= {goal['paired_ratio_median_at_least']}: {_met(goal)}" if goal else "")
        )
    return "\n".join(lines)


def _met(goal: dict[str, Any]) -> str:
    return "met" if goal["met"] else "NOT met"


def profile_loader(name: str, urls: Sequence[str], cfg: SimpleNamespace, samples: int, top: int = 25) -> str:
    """cProfile one loader in-process (num_workers=0, one torch thread as in a loader worker) over ``samples``."""
    batches = math.ceil(samples / cfg.batch_size)
    with quiet(threads=1):  # the default (one per core) makes tiny ops wait on thread barriers in the profile
        loader = BUILDERS[name](urls, cfg, (batches + 2) * cfg.batch_size, 0)
        if hasattr(getattr(loader, "dataset", None), "restore_rngs"):
            loader.dataset.restore_rngs = False  # ours: profile what a loader worker runs (no RNG save/restore)
        it = iter(loader)
        next(it)
        prof, t0 = cProfile.Profile(), time.perf_counter()
        n = prof.runcall(lambda: sum(len(_images(next(it))) for _ in range(batches)))
        dt = time.perf_counter() - t0
    out = io.StringIO()
    out.write(f"== {name}: {n} samples in {dt:.2f} s under cProfile ({n / dt:.0f} samples/s, num_workers=0)\n")
    stats = pstats.Stats(prof, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------------------- history
def history_entry(result: dict[str, Any], before: dict[str, Any]) -> dict:
    """One line of ``history/loader.jsonl``: per image size every loader's figures, the ratios and the goal; the
    commit and the machine."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "torchvision", "pillow", "webdataset", "open_clip_torch"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    sizes = {}
    for size, r in result["sizes"].items():
        keep = ("median", "min", "max", "cpu_ms_per_sample")
        sizes[size] = {name: {k: round(s[k], 3) for k in keep} for name, s in r["summary"].items()}
        sizes[size]["paired_ratios"] = [round(x, 3) for x in r["paired_ratios"]]
        for key in ("ratio", "paired_ratio_median", "own_tar_gain"):
            sizes[size][key] = round(r[key], 3)
        sizes[size]["target"] = r.get("target")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": before["commit"],
        "loader_files_modified": before["loader_files_modified"],
        "stored": result["settings"]["stored"],
        "settings": result["settings"],
        "shards": result["shards"],
        "sizes": sizes,
        "machine": {**result["machine"], "load_before": before["load"], "load_after": loadavg(), **versions},
    }


def format_history(path: str) -> str:
    """The history file as a Markdown table, oldest first (one row per run and image size)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        sizes = r.get("sizes") or {r["image_size"]: r}  # lines before the three-loader table: one size each
        for size, s in sizes.items():
            goal = s.get("target")
            row = {
                "date": r["date"][:16],
                "commit": f"{r['commit']}{'+' if r.get('loader_files_modified') else ''}",
                "px (stored)": f"{size} ({(r.get('stored') or ['?'])[0]})",
            }
            row |= {name: round(s[name]["median"]) if name in s else None for name in LOADERS}
            row["paired ratio (median)"] = s["paired_ratio_median"]
            row["goal"] = f">= {goal['paired_ratio_median_at_least']} {_met(goal)}" if goal else ""
            rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False)


# ------------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and return the result (``settings``, ``sizes``: per size the runs,
    ``summary``, ratios and goal)."""
    p = parser("loader", __doc__, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard pattern to read (default: generate the tiny world's web split)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (every loader)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, nargs="+", default=[64, 112, 224], help="transform sizes, in one run")
    p.add_argument("--stored-size", type=int, default=384, help="side of the generated world's stored images")
    p.add_argument("--full-decode", action="store_true", help="ours: no reduced-scale JPEG decoding (A/B)")
    p.add_argument("--samples", type=int, default=4096, help="timed samples per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per loader and size, in turns")
    p.add_argument("--warmup-batches", type=int, default=None, help="untimed batches after the first (2 x workers)")
    p.add_argument("--shuffle-buffer", type=int, default=OPEN_CLIP_SAMPLE_SHUFFLE_SIZE, help="ours (open_clip: 5000)")
    p.add_argument("--shuffle-initial", type=int, default=OPEN_CLIP_SAMPLE_SHUFFLE_INITIAL, help="ours (1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-dir", help="where the default shards are generated (reused); default: a temporary dir")
    p.add_argument("--world-samples", type=int, default=4000, help="web samples of the generated world")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per generated shard")
    p.add_argument("--record", nargs="?", const=str(HISTORY), metavar="FILE", help="append the run to the history")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a run misses its TARGETS goal")
    p.add_argument("--history", nargs="?", const=str(HISTORY), metavar="FILE", help="print the history and exit")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile N samples of each loader instead")
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
    if a.history:
        print(format_history(a.history))
        return {"history": a.history}
    # what was measured: the commit and the loader files' state when the run starts
    dirty = git("status", "--porcelain", "--", *LOADER_FILES)
    before = {"commit": commit() or None, "loader_files_modified": None if dirty is None else bool(dirty)}
    before["load"] = loadavg()
    from datamodules.shards import expand_urls

    with tempfile.TemporaryDirectory(prefix="bench-loader-", ignore_cleanup_errors=True) as tmp:
        if a.shards:
            pattern, how = a.shards, "given"
        else:
            world = Path(a.world_dir or tmp)
            pattern, how = default_shards(world, a.world_samples, a.shard_size, a.seed, a.stored_size)
        urls = expand_urls(pattern)
        keys = ("workers", "batch_size", "samples", "warmup_batches", "shuffle_buffer", "shuffle_initial", "seed")
        settings = {k: getattr(a, k) for k in keys} | {"full_decode": a.full_decode}
        settings["mean_image_kb"], settings["stored"] = first_image(urls[0])
        decode = " (ours: full-size decode)" if a.full_decode else ""
        stored = f"stored images {settings['stored']} px, {settings['mean_image_kb']} KB each"
        runs = f"{a.repeats} runs per loader and size, {a.samples} timed samples each{decode}"
        print(f"shards: {pattern} ({len(urls)} shards, {how}); {stored}; {os.cpu_count()} CPUs; {runs}", flush=True)
        if a.profile:
            cfg = SimpleNamespace(**settings, image_size=a.image_size[0])
            for name in LOADERS:
                print(profile_loader(name, urls, cfg, a.profile), flush=True)
            return {"profile": True, "shards": pattern}
        result = {"shards": pattern, "num_shards": len(urls), "settings": settings, "machine": machine(), "sizes": {}}
        import datamodules.caption_mix  # noqa: F401  (imports before the first run, which would pay for them)

        _transforms(a.image_size[0])
        for size in a.image_size:
            result["sizes"][size] = measure_size(urls, SimpleNamespace(**settings, image_size=size), a.repeats)
    print(format_table(result), flush=True)
    if a.record:
        record(a.record, history_entry(result, before))
    write_json(a.json, result)
    return result


if __name__ == "__main__":
    _result = main()
    if "--check" in sys.argv[1:] and not all(r.get("target", {}).get("met", True) for r in _result["sizes"].values()):
        sys.exit(1)
