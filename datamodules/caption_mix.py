"""``CaptionMixDataModule``: the one DataModule that the captioner, Recap-CLIP and Recap-DiT share.

It reads img2dataset webdataset shards (``KEY.jpg``/``KEY.txt``/``KEY.json``) and picks one of several named caption
sources per sample: the paper's p is ``p_original``, the probability of the ORIGINAL web caption (p=1: plain DataComp,
p=0: recaptions only; paper §5.2). Images and text are transformed by the model that uses the module
(:class:`DataTransforms`), so CLIP, LLaVA and DiT each get their own preprocessing from one loader. A loader worker's
pipeline is one list of stages, as open_clip's ``get_wds_dataset`` builds it: ``CaptionMixStream._batches`` (the
stages are in :mod:`datamodules.wds_stages`).

Mid-epoch resume (``CaptionMixLoader.state_dict``, in every checkpoint): a worker's stream is a pure function of
``(seed, epoch, rank, worker)``, so the state is the epoch, the batches consumed in it and each worker's stream
position. A resumed worker replays its stream to that position reading tars but decoding nothing; random transforms
are seeded per sample position, so the continued batches equal the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, Sampler, default_convert, get_worker_info

from datamodules.checks import (
    ConfigError,
    RunContext,
    check_path,
    check_sample_limits,
    check_shards,
    per_device_batch,
)
from datamodules.monitor import add_monitor
from datamodules.p_schedule import PSchedule
from datamodules.partial_captions import ViewSpec
from datamodules.shards import expand_urls
from datamodules.wds_stages import (
    DEDUPE_MODES,
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_CAPTION_CHARS,
    MIN_IMAGE_SIZE,
    SKIPS_ONLY,
    ChooseCaption,
    CountingHandler,
    CrossShardDuplicates,
    ReadShards,
    SampleLimits,
    ShardSchedule,
    SkipStats,
    SourceSpec,
    batched,
    choose_views,
    ensure_duplicate_index,
    keep_captioned,
    merge_skips,
    stable_int,
    transform_text,
)

# Lightning warns that an IterableDataset's __len__ "could be inaccurate" with several workers; ours is exact (each
# worker has a fixed batch quota summing to the rank's length). An empty list is how a DataModule says "no val set".
warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined.*")
warnings.filterwarnings("ignore", message=r".*Total length of `list` across ranks is zero.*")

DEFAULT_SOURCES = {"original": "txt", "recaption": "sidecar:re_caption"}


@dataclass
class DataTransforms:
    """What a LightningModule's ``data_transforms(stage)`` hands the DataModule: per-sample image and text transforms
    (picklable callables); the DataModule's own ``image_transform``/``text_transform`` take precedence.
    ``conversation`` (chat messages -> encoded sample) is for LLaVA's json formats (``datamodules.llava_json``)."""

    image: Callable | None = None
    text: Callable | None = None
    conversation: Callable | None = None


# ------------------------------------------------------------------------------------------------------------ shards
def count_samples(urls: Sequence[str]) -> int:
    """Number of usable samples in the shards, from img2dataset's ``NNNNN_stats.json`` (``successes``) or, failing
    that, its ``NNNNN.parquet`` (rows with status ``success``). Raises naming the first shard with neither."""
    import fsspec
    import pyarrow.parquet as pq

    total = 0
    for url in urls:
        if url.startswith("pipe:"):
            raise ValueError(f"cannot count samples of {url!r} (a pipe: URL); set train_num_samples")
        stem = url[: -len(".tar")] if url.endswith(".tar") else url
        try:
            with fsspec.open(stem + "_stats.json", "r") as f:
                total += int(json.load(f)["successes"])
            continue
        except (FileNotFoundError, KeyError, TypeError, ValueError, OSError):  # missing, or not a {"successes": N}
            pass
        try:
            table = pq.read_table(stem + ".parquet", columns=None)
        except (FileNotFoundError, OSError) as exn:
            raise ValueError(
                f"cannot count samples of shard {url!r}: neither {stem}_stats.json nor {stem}.parquet (img2dataset "
                f"writes both) is readable; set train_num_samples"
            ) from exn
        if "status" in table.column_names:
            total += table.column("status").to_pylist().count("success")
        else:
            total += table.num_rows
    return total


# ----------------------------------------------------------------------------------------------------------- dataset
class SharedEpoch:
    """The epoch number, shared with (persistent) loader workers through shared memory (open_clip's idea). The
    shared value only travels to spawned loader workers; other pickling (``ddp_spawn``, deep copies) carries the
    number."""

    def __init__(self, epoch: int = 0):
        self._epoch = epoch
        self._value = None

    def _shared(self):
        if self._value is None:
            self._value = mp.Value("i", self._epoch)
        return self._value

    def set(self, epoch: int) -> None:
        self._epoch = epoch
        self._shared().value = epoch

    def get(self) -> int:
        return self._value.value if self._value is not None else self._epoch

    def __getstate__(self) -> dict:
        from multiprocessing.context import get_spawning_popen

        spawning = get_spawning_popen() is not None
        return {"_epoch": self.get(), "_value": self._value if spawning else None}


@dataclass
class LoaderSettings:
    """The DataModule's loader settings, built once from its init arguments (the same names; their defaults and
    meaning are there) and handed to every stream."""

    sources: list[SourceSpec]
    weights: dict[str, float]
    limits: SampleLimits
    views: tuple[ViewSpec, ...]
    p_schedule: PSchedule | None
    mix: str
    concat_separator: str
    fallback: bool
    sidecar_dir: str | None
    seed: int
    resampled: bool
    shuffle_buffer: int
    shuffle_initial: int
    max_consecutive_drops: int | None
    dedupe: str
    dedupe_max_keys: int
    tar_reader: str = "own"  # "webdataset": webdataset's tar reading instead (benchmarks/loader.py's A/B)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> LoaderSettings:
        """From the DataModule's init arguments, checked: the same names, plus the parsed sources, weights, limits."""
        limits = {k: args[k] for k in LIMIT_KEYS}
        check_sample_limits(**limits)
        if args["dedupe"] not in DEDUPE_MODES:
            raise ConfigError("dedupe", args["dedupe"], f"must be one of {list(DEDUPE_MODES)}")
        max_keys = args["dedupe_max_keys"]
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigError("dedupe_max_keys", max_keys, "must be an integer >= 1")
        sources = [SourceSpec.parse(n, s) for n, s in (args["sources"] or DEFAULT_SOURCES).items()]
        names = [s.name for s in sources]
        schedule = parse_schedule(args.get("p_schedule"), names, args)
        p_original = schedule(0) if schedule is not None else args["p_original"]  # validation's p: the value at 0
        weights = resolve_weights(names, p_original, args["source_weights"], args["mix"])
        views = parse_views(args.get("views"), names)
        parsed = ("sources", "views", "p_schedule")
        same = {f.name: args[f.name] for f in fields(cls) if f.name in args and f.name not in parsed}
        return cls(
            sources=sources, weights=weights, limits=SampleLimits(**limits), views=views, p_schedule=schedule, **same
        )


def parse_schedule(cfg: dict | None, names: list[str], args: dict[str, Any]) -> PSchedule | None:
    """``p_schedule`` checked against the rest of the mix; None without one."""
    if cfg is None:
        return None
    for other in ("p_original", "source_weights"):
        if args.get(other) is not None:
            raise ConfigError("p_schedule", cfg, f"replaces {other}: set one of them, not both")
    if args.get("mix", "sample") != "sample":
        raise ConfigError("p_schedule", cfg, "needs mix='sample' (concat draws no caption)")
    if "original" not in names or len(names) != 2:
        raise ConfigError("p_schedule", cfg, f"needs exactly two caption sources, one named 'original'; got {names}")
    return PSchedule.parse(cfg)


def parse_views(cfg: dict | None, names: list[str]) -> tuple[ViewSpec, ...]:
    """``views`` as specs; ``text`` is reserved (the p-drawn ``batch["text"]`` goes by that name in a loss)."""
    if cfg is None:
        return ()
    if not isinstance(cfg, dict) or not cfg:
        raise ConfigError("views", cfg, "must be a non-empty mapping {view name: source | {source, partial}}")
    if "text" in cfg:
        raise ConfigError("views.text", cfg["text"], "is reserved for the p-drawn caption (batch['text'])")
    return tuple(ViewSpec.parse(str(name), value, names) for name, value in cfg.items())


@dataclass(eq=False)
class CaptionMixStream(IterableDataset):
    """An iterable of ready batches (dicts; fields: :func:`datamodules.wds_stages.batched`).

    ``batches_per_rank`` set: training -- the stream cycles its shards (or resamples) and every rank yields exactly
    that many batches per epoch, split over loader workers as evenly as possible (so DDP never hangs on a rank that
    ran out). ``None``: evaluation -- one pass over this rank's disjoint shard slice, last batch partial.
    """

    urls: list[str]
    settings: LoaderSettings
    _: KW_ONLY
    batch_size: int
    rank: int
    world_size: int
    batches_per_rank: int | None
    transforms: DataTransforms
    epoch: SharedEpoch | int = 0
    dedupe_index: str | None = None
    resume: dict[str, Any] | None = field(default=None, init=False)  # set by CaptionMixLoader for one iteration
    # Put the global RNGs back after each training batch (the transforms are seeded per sample): None = only in the
    # training process (no loader workers), see SampleSeeds; False lets an in-process profile measure what a worker
    # runs.
    restore_rngs: bool | None = field(default=None, init=False)

    @property
    def seed(self) -> int:
        return self.settings.seed

    def __len__(self) -> int:
        if self.batches_per_rank is None:
            raise TypeError("an evaluation stream has no length")
        return self.batches_per_rank

    def current_epoch(self) -> int:
        return self.epoch.get() if isinstance(self.epoch, SharedEpoch) else int(self.epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._batches()
        training = self.batches_per_rank is not None
        restore = get_worker_info() is None if self.restore_rngs is None else self.restore_rngs
        return _rng_isolated(batches) if training and restore else batches

    def _batches(self) -> Iterator[dict[str, Any]]:
        s, training = self.settings, self.batches_per_rank is not None
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.current_epoch()
        resume, self.resume = self.resume, None  # one iteration only (this is the worker's own copy)
        stats = SkipStats(max_consecutive_drops=s.max_consecutive_drops, record=True)
        done, skip, limit, seeds, p_at = 0, None, None, None, None
        if training:
            if resume is not None:
                worker, done, skip = worker_resume_point(resume, worker, num_workers)
            limit = len(range(worker, self.batches_per_rank, num_workers)) - done  # see worker_resume_point
            # the stream position of each sample seeds its transforms; a resume replays up to the recorded position
            # without decoding, or (position unknown) decodes the replayed batches to drop exactly the same images
            seeds = SampleSeeds(
                stable_int("transform", s.seed, epoch, self.rank, worker), stats, skip if done else None
            )
        if training and s.p_schedule is not None:
            # The p draw waits for the decode, which drops images: the kept-th kept sample of this stream worker goes
            # to its batch kept // batch_size, loader batch k * num_workers + worker of the epoch (see
            # worker_resume_point) and global batch epoch * batches_per_rank + that; p is the schedule at that
            # global batch x batch_size x world_size. A resume with a known position starts kept at the samples it
            # skipped undecoded; otherwise drop_replayed drops the replayed ones after this draw.
            def p_at(kept: int) -> float:
                index = epoch * self.batches_per_rank + worker + (kept // self.batch_size) * num_workers
                return s.p_schedule(index * self.batch_size * self.world_size)

        chooser = ChooseCaption(s.weights, s.seed, epoch, stats, s.mix, s.concat_separator, s.fallback)
        shuffle, views = None, None
        if training and s.shuffle_buffer > 1:
            rng = random.Random(stable_int("buffer", s.seed, epoch, self.rank, worker))
            shuffle = wds.shuffle(s.shuffle_buffer, s.shuffle_initial, rng=rng)
        if s.views:
            order = sorted(s.weights, key=lambda n: -s.weights[n])  # ChooseCaption's fallback order
            views = partial(
                choose_views, views=s.views, order=order, seed=s.seed, epoch=epoch, stats=stats, fallback=s.fallback
            )
        duplicates = None if s.dedupe == "off" else CrossShardDuplicates(s.dedupe, s.dedupe_max_keys, self.dedupe_index)
        mode = ("resample" if s.resampled else "cycle") if training else "once"
        text = self.transforms.text
        pipeline = [
            ShardSchedule(self.urls, s.seed, epoch, self.rank, self.world_size, worker, num_workers, mode, True, stats),
            ReadShards(CountingHandler(stats), s.tar_reader),
            s.limits.extract(s.sources, s.sidecar_dir, stats, duplicates),
            shuffle,
            chooser if p_at is None else partial(keep_captioned, stats=stats),
            views,
            seeds,
            s.limits.decode(self.transforms.image, stats),
            partial(chooser, p_at=p_at, kept=done * self.batch_size if skip is not None else 0) if p_at else None,
            partial(drop_replayed, count=done * self.batch_size, stats=stats) if done and skip is None else None,
            partial(transform_text, transform=text) if text is not None else None,
            partial(batched, batch_size=self.batch_size, stats=stats, last_partial=not training, limit=limit),
        ]
        stream = iter(pipeline[0])
        for stage in pipeline[1:]:
            if stage is not None:
                stream = stage(stream)
        for batch in stream:
            if seeds is not None:
                batch[POSITION_KEY] = (worker, seeds.n)
            yield batch


# ---------------------------------------------------------------------------------------------------------- resume
POSITION_KEY = "_stream_position"  # (worker, position) a training stream attaches to each batch; the loader pops it
LIMIT_KEYS = tuple(SampleLimits().as_dict())
DEDUPE_KEYS = ("dedupe", "dedupe_max_keys")
"""Recorded in loader states since they exist; a state without them is not compared on them."""


def worker_resume_point(resume: dict[str, Any], worker: int, num_workers: int) -> tuple[int, int, int | None]:
    """``(stream worker, batches it already produced, its stream position or None)`` for loader worker ``worker``
    resuming after ``resume["batches"]`` batches.

    PyTorch hands out a loader's batches round-robin over its workers, starting at worker 0 on every new iterator
    (in an epoch, worker ``i % num_workers`` makes batch ``i``: our per-worker quotas differ by at most one, lower ids
    first). After ``B`` batches the next one is stream worker ``B % num_workers``'s, so loader worker ``w`` plays
    stream worker ``(w + B) % num_workers`` for the rest of the epoch (whose remaining quotas again differ by at
    most one, lower loader ids first).
    """
    batches = resume["batches"]
    stream_worker = (worker + batches) % num_workers
    done = len(range(stream_worker, batches, num_workers))
    positions = resume.get("positions")
    skip = positions[stream_worker] if positions is not None and stream_worker < len(positions) else None
    return stream_worker, done, skip


class SampleSeeds:
    """Stage: seeds the model's (random) transforms per sample by its stream position ``n`` (counted from 1).

    Torch seeds loader workers from the main process's RNG when an iterator starts, so after a resume random crops
    would differ; seeding torch's CPU generator, ``random`` and numpy's global RNG (what torchvision, timm and
    open_clip transforms draw from) from ``(seed, epoch, rank, worker, position)`` as each sample enters the decode
    stage makes them the same, and lets a resume skip the transforms of replayed samples (nothing else in the stream
    draws from the global RNGs). ``replay``: pass on nothing up to that position (a resume; no decode, so the "N
    unusable in a row" guard must not add up the replay), then drop the skips counted so far (reported before).

    The training process's own RNGs are kept apart by :func:`_rng_isolated` when the transforms run there
    (``num_workers=0``): once per batch, since per transform call it cost ~110 us for numpy's legacy state alone.
    """

    def __init__(self, base: int, stats: SkipStats, replay: int | None = None):
        self.base, self.stats, self.replay, self.n = base, stats, replay, 0

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.replay is not None:
            for _ in itertools.islice(samples, self.replay):
                self.n += 1
                self.stats.used()
            self.stats.drain()
        gen = torch.default_generator
        for sample in samples:
            self.n += 1
            seed = stable_int(self.base, self.n)
            gen.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            yield sample


def drop_replayed(samples: Iterator[dict[str, Any]], count: int, stats: SkipStats) -> Iterator[dict[str, Any]]:
    """Stage: drops the first ``count`` decoded samples of a resumed stream whose position was not recorded (the
    decode stage then drops exactly the images it dropped before), and the skips counted while replaying them."""
    for _ in itertools.islice(samples, count):
        pass
    stats.drain()
    yield from samples


def _rng_isolated(items: Iterator[Any]) -> Iterator[Any]:
    """``items``, with torch's CPU generator, ``random`` and numpy's global RNG put back after producing each item
    (so a stream that seeds them per sample leaves the consuming process's RNGs as they were)."""
    gen = torch.default_generator
    with contextlib.closing(items):
        while True:
            saved = gen.get_state(), random.getstate(), np.random.get_state()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                gen.set_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])
            yield item


class _EpochSampler(Sampler):
    """The (unused) sampler of an iterable-dataset DataLoader, given a ``set_epoch``.

    Lightning calls ``dataloader.sampler.set_epoch(epoch)`` at the start of every epoch (also after a resume), which
    is the one hook that reaches an iterable dataset's epoch; the value reaches workers through shared memory.
    """

    def __init__(self, shared: SharedEpoch):
        self.shared = shared

    def __iter__(self) -> Iterator[None]:
        return itertools.repeat(None)  # what torch's default sampler for iterable datasets yields: one per fetch

    def set_epoch(self, epoch: int) -> None:
        self.shared.set(epoch)


class SkipLog:
    """The loader's skip log: one JSON line per skipped sample or shard-level event, appended as batches arrive.

    A line: ``{"key", "reason", "shard", "split", "epoch", "rank", "detail"}`` (``key`` null for shard-level events);
    caption problems of samples that were still used are not logged (``wds_stages.UNRECORDED_PREFIXES``); records a
    worker left out add ``{"reason": "records_lost", "count": N, ...}``. Opened lazily (no file when nothing was
    skipped) and held across batches (one open per iteration, not per batch: the log often sits on a network file
    system), flushed after every batch, appended to (a resumed run continues it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: Any = None

    def write(self, skipped: dict[str, Any], **fields: Any) -> None:
        records, lost = skipped.get("records") or (), skipped.get("records_lost", 0)
        if not records and not lost:
            return
        lines = [
            {
                "key": r.get("key"),
                "reason": r.get("reason"),
                "shard": r.get("shard"),
                **fields,
                "detail": r.get("detail"),
            }
            for r in records
        ]
        if lost:
            lines.append({"key": None, "reason": "records_lost", "count": lost, **fields})
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- held across batches, closed by close()
        self._file.writelines(json.dumps(line) + "\n" for line in lines)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def convert_batch(batch: Any) -> Any:
    """torch's ``default_convert`` (what a ``DataLoader`` with ``batch_size=None`` applies in the worker), except that
    a list of strings is passed through instead of being walked string by string (~10 us per sample)."""
    if isinstance(batch, dict):
        return {k: convert_batch(v) for k, v in batch.items()}
    if isinstance(batch, list) and all(type(x) is str for x in batch):
        return batch
    return default_convert(batch)


class CaptionMixLoader(DataLoader):
    """A plain ``DataLoader`` over a :class:`CaptionMixStream` or a ``latent_cache.LatentCacheStream`` (batches are
    made in the workers) with ``set_epoch`` and a resumable position (``state_dict`` / ``load_state_dict``, which
    Lightning saves in checkpoints and restores at the start of ``fit(ckpt_path=...)``).

    The state: ``epoch``, ``batches`` consumed in it, ``positions`` (rank -> per-worker stream positions, gathered
    from all ranks in DDP), and what must match to resume exactly (workers, world size, batches per rank, seed,
    batch size, the sample limits and dedupe mode of a stream that has them). A rank missing from ``positions``
    still resumes exactly from ``(epoch, batches)``, decoding the replayed images to find the dropped ones.

    Skips: every batch's ``skipped`` counts are summed into ``skip_counts`` (the current or last iteration) and, with
    ``skip_log`` (a path), written to that file (:class:`SkipLog`). An evaluation stream is read one batch
    ahead, so that skips counted after a worker's last batch (``SKIPS_ONLY`` items) join a batch the model sees; when
    no batch comes at all they are still counted and logged, and a warning says so.
    """

    def __init__(
        self, dataset: CaptionMixStream, *, split: str = "train", skip_log: str | os.PathLike | None = None, **kwargs
    ):
        kwargs.setdefault("collate_fn", convert_batch)
        super().__init__(dataset, batch_size=None, **kwargs)
        self.split, self.skip_log = split, skip_log
        self.skip_counts: Counter = Counter()
        if isinstance(dataset.epoch, SharedEpoch):
            # DataLoader forbids passing a sampler with an iterable dataset and setting one after __init__; the
            # replacement keeps the default's behaviour (yield None forever) and only adds set_epoch.
            object.__setattr__(self, "sampler", _EpochSampler(dataset.epoch))
        self._pending: dict[str, Any] | None = None  # a loaded state, applied by the next iteration
        self._progress: dict[str, Any] | None = None  # of the current (or last) iteration

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.dataset.epoch, SharedEpoch):
            self.dataset.epoch.set(epoch)

    # ----------------------------------------------------------------------------------------------- resume
    def __iter__(self) -> Iterator[Any]:
        # A generator, so lazy: the workers start (and read the epoch) at the first next(), not at iter(). Lightning
        # calls iter() on a resumed loader before it calls set_epoch, which would otherwise race the workers for the
        # epoch number.
        ds = self.dataset
        epoch, rank = ds.current_epoch(), ds.rank
        state, self._pending = self._pending, None
        workers = max(1, self.num_workers)
        plan, positions = None, [0] * workers
        if state is not None and state["epoch"] == epoch and state["batches"] > 0:
            plan = {"batches": state["batches"], "positions": state["positions"].get(str(rank))}
            positions = list(plan["positions"]) if plan["positions"] is not None else [None] * workers
        progress = {"epoch": epoch, "batches": plan["batches"] if plan else 0, "positions": positions}
        ds.resume = plan
        try:
            iterator = super().__iter__()
        finally:
            if self.num_workers > 0:
                ds.resume = None  # the workers took their copy; later iterations must not replay again
        self._progress = progress
        lookahead = getattr(ds, "batches_per_rank", 0) is None  # evaluation: trailing skips join the last batch
        counts = self.skip_counts = Counter()
        log = SkipLog(self.skip_log) if self.skip_log else None
        held: dict[str, Any] | None = None  # lookahead: the batch not yet passed on
        carry: dict[str, Any] | None = None  # skips that came before any batch could take them
        try:
            for batch in iterator:  # a dict from either stream
                skipped = batch.get("skipped")
                if skipped:
                    counts.update(skipped.get("counts", {}))
                    if log is not None:
                        log.write(skipped, split=self.split, epoch=epoch, rank=rank)
                if batch.pop(SKIPS_ONLY, False):
                    if held is not None:
                        merge_skips(held["skipped"], skipped)
                    else:
                        carry = merge_skips(carry or {}, skipped)
                    continue
                if carry is not None:
                    batch["skipped"] = merge_skips(carry, batch.get("skipped") or {})
                    carry = None
                where = batch.pop(POSITION_KEY, None)
                if where is not None:
                    positions[where[0]] = where[1]
                if lookahead:
                    held, batch = batch, held
                    if batch is None:
                        continue
                progress["batches"] += 1
                yield batch
            if held is not None:
                progress["batches"] += 1
                yield held
            elif carry is not None:
                warnings.warn(
                    f"caption-mix {self.split} loader: no usable sample; skipped {carry.get('counts')}"
                    + (f" (every skip is in {self.skip_log})" if self.skip_log else ""),
                    stacklevel=2,
                )
        finally:
            if log is not None:
                log.close()

    def _fingerprint(self) -> dict[str, Any]:
        ds = self.dataset
        fingerprint = {
            "num_workers": max(1, self.num_workers),
            "world_size": ds.world_size,
            "batches_per_rank": getattr(ds, "batches_per_rank", None),
            "seed": ds.seed,
            "batch_size": ds.batch_size,
        }
        settings = getattr(ds, "settings", None)  # a LatentCacheStream has none: its cache was filtered when built
        if settings is not None:
            fingerprint.update(settings.limits.as_dict(), dedupe=settings.dedupe)
            fingerprint["dedupe_max_keys"] = settings.dedupe_max_keys if settings.dedupe == "worker" else None
        return fingerprint

    def state_dict(self) -> dict[str, Any]:
        """The loader's position (plain Python values). In DDP every rank must call it (Lightning does, in
        ``dump_checkpoint``): the per-worker positions are gathered from all ranks."""
        if self._pending is not None:
            return dict(self._pending)  # loaded but not iterated yet: still the same position
        ds = self.dataset
        progress = self._progress or {"epoch": ds.current_epoch(), "batches": 0, "positions": None}
        positions = progress["positions"]
        all_positions = _gather_positions(ds.rank, list(positions) if positions is not None else None)
        return {
            "format": 1,
            "epoch": progress["epoch"],
            "batches": progress["batches"],
            "positions": {r: p for r, p in all_positions.items() if p is not None},
            **self._fingerprint(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict`` at the next iteration (if its epoch is the loader's epoch then)."""
        if state_dict.get("format") != 1:
            raise ValueError(f"loader state: unknown format {state_dict.get('format')!r} (expected 1)")
        mine = self._fingerprint()
        compared = {k: v for k, v in mine.items() if k in state_dict or k not in LIMIT_KEYS + DEDUPE_KEYS}
        diff = {k: (state_dict.get(k), v) for k, v in compared.items() if state_dict.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot resume the data loader exactly mid-epoch: {what}. Resume with the data settings of the "
                f"interrupted run (data.num_workers, data.batch_size, data.seed, data.min_image_size, "
                f"data.max_image_pixels, data.max_caption_chars, data.jpeg_draft, data.dedupe, data.dedupe_max_keys, "
                f"number of devices)"
            )
        self._pending = dict(state_dict)
        bpr = mine["batches_per_rank"]
        finished = bpr is not None and state_dict["batches"] >= bpr
        self.set_epoch(state_dict["epoch"] + 1 if finished else state_dict["epoch"])
        if getattr(self, "_iterator", None) is not None:
            # persistent workers hold their own copy of the dataset: restart them so they see the resume plan
            self._iterator._shutdown_workers()
            self._iterator = None


def _gather_positions(rank: int, positions: list[int | None] | None) -> dict[str, list[int | None] | None]:
    """``{rank: positions}`` of every rank (an all-gather under torch.distributed, else this rank's)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (rank, positions))
        return {str(r): p for r, p in gathered}
    return {str(rank): positions}


# ------------------------------------------------------------------------------------------------------- datamodule
class CaptionMixDataModule(L.LightningDataModule):
    """Webdataset image-caption shards with a per-sample choice among named caption sources.

    Args:
        train_shards: Path, brace pattern (``web/{00000..00019}.tar``), glob, directory, fsspec URL, ``pipe:``
            command, a ``::``-joined list of those, or a list.
        batch_size: Per-device batch size. Give this or ``global_batch_size``.
        p_original: The paper's p: probability of the ``original`` source (the other one gets ``1 - p``); needs
            exactly two sources, one named ``original``. Mutually exclusive with ``source_weights``.
        source_weights: Probabilities over any number of sources, summing to 1 (weight 0: only a fallback).
        sources: Caption source name -> ``"txt"`` (a tar member), ``"json:FIELD"`` (a field of the ``.json`` member)
            or ``"sidecar:COLUMN"`` (a column of the per-shard sidecar parquet in ``sidecar_dir``). Default
            ``{"original": "txt", "recaption": "sidecar:re_caption"}``.
        mix: ``"sample"`` (one source per sample and epoch) or ``"concat"`` (all available sources joined in source
            order, Table 3's "*concat").
        concat_separator: Separator between captions in ``"concat"`` mode.
        fallback: A sample missing its drawn source uses another available one (``fallback:<from>-><to>``); False:
            the sample is skipped.
        sidecar_dir: Folder of per-shard sidecar parquets (``python -m experiments sidecars``).
        val_shards: Validation shards (one pass, disjoint per rank, epoch 0's caption draws).
        test_shards: Test shards (as validation).
        train_num_samples: Samples per epoch; default: counted from img2dataset's ``*_stats.json``/``*.parquet``.
        num_workers: Loader worker processes per rank.
        resampled: Draw training shards with replacement (open_clip ``--dataset-resampled``).
        shuffle_buffer: Samples (held encoded) in each worker's shuffle buffer.
        shuffle_initial: Samples buffered before the first one is yielded.
        seed: Seed of shard order, shuffle buffers and caption draws.
        image_transform: Per-sample image transform (PIL -> tensor); default: the model's ``data_transforms``.
        text_transform: Per-caption transform (e.g. a tokenizer); default: the model's ``data_transforms``.
        min_image_size: Images with a shorter side below this are skipped (``tiny_image``); ``None``: no minimum.
        max_image_pixels: Images with more pixels (read from the header) are skipped (``oversized_image``); at
            least ``min_image_size`` squared, at most twice PIL's ``MAX_IMAGE_PIXELS``; ``None``: PIL's limit.
        max_caption_chars: A longer caption counts as missing for its source (``caption_too_long``); ``None``: no
            cap.
        jpeg_draft: Decode JPEGs at a reduced DCT scale where the image transform's first resize still gets its
            output size; ``False``: always at full size.
        max_consecutive_drops: Stop with an error after this many unusable samples in a row (broken data would
            otherwise spin forever in a cycling stream); ``None``: never.
        dedupe: A key also in another shard: ``"worker"`` (dropped when this worker read it from another shard
            this epoch), ``"global"`` (read from its first shard only; an index built in ``prepare_data``) or
            ``"off"`` (README: "Duplicate keys").
        dedupe_max_keys: ``"worker"``: keys remembered per loader worker and epoch; ``"global"``: keys held in
            memory at a time while the index is built.
        dedupe_dir: ``"global"``: the folder of index files; default ``$XDG_CACHE_HOME/recap_suite/dedupe``.
        skip_log: Where every skipped sample is written, one JSON line each: ``True`` =
            ``<trainer.log_dir>/skipped.jsonl`` (nothing without a Trainer), a path, ``False``/``None`` = no log.
            Rank r > 0 writes ``skipped.rank<r>.jsonl`` beside it (README: "Skipped samples").
        persistent_workers: Keep loader workers alive across epochs.
        pin_memory: Pin batches (GPU training).
        rank: Override the rank (simulating multi-process runs without a Trainer); default: from the Trainer.
        world_size: Override the world size; default: from the Trainer.
        global_batch_size: Samples per optimizer step over all ranks (the paper's unit) instead of ``batch_size``;
            must divide evenly over devices x num_nodes x accumulate_grad_batches.
        views: Extra text views of every sample: view name -> a source name or ``{source: NAME, partial: PRESET |
            {mode, k, n}}``; batches then carry ``texts`` and ``view_captions`` (docs/clip.md, "Views").
        p_schedule: p as a function of the training samples seen, instead of ``p_original``
            (``datamodules.p_schedule``); batches carry their ``p_target``; validation uses the value at 0.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        batch_size: int | None = None,
        p_original: float | None = None,
        source_weights: dict[str, float] | None = None,
        sources: dict[str, str] | None = None,
        mix: Literal["sample", "concat"] = "sample",
        concat_separator: str = " ",
        fallback: bool = True,
        sidecar_dir: str | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        train_num_samples: int | None = None,
        num_workers: int = 2,
        resampled: bool = False,
        shuffle_buffer: int = 1000,
        shuffle_initial: int = 100,
        seed: int = 0,
        image_transform: Callable | None = None,
        text_transform: Callable | None = None,
        min_image_size: int | None = MIN_IMAGE_SIZE,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_caption_chars: int | None = MAX_CAPTION_CHARS,
        jpeg_draft: bool = True,
        max_consecutive_drops: int | None = 10_000,
        skip_log: bool | str | None = True,
        dedupe: Literal["worker", "global", "off"] = "worker",
        dedupe_max_keys: int = 500_000,
        dedupe_dir: str | None = None,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        global_batch_size: int | None = None,
        views: dict[str, str | dict] | None = None,
        p_schedule: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["image_transform", "text_transform"])
        self.settings = LoaderSettings.from_args(self.hparams)
        self.train_shards, self.val_shards, self.test_shards = train_shards, val_shards, test_shards
        self.sources, self.sidecar_dir, self.limits = self.settings.sources, sidecar_dir, self.settings.limits
        self.transforms = DataTransforms(image_transform, text_transform)
        self._log_dir: str | None = None
        self._rank, self._world_size = rank, world_size
        self.epoch = SharedEpoch(0)
        self.batch_size = per_device_batch(batch_size, global_batch_size, world_size)  # None until the world is known
        sidecar_sources = [s.name for s in self.sources if s.kind == "sidecar"]
        if sidecar_sources and not sidecar_dir:
            raise ValueError(f"caption sources {sidecar_sources} read 'sidecar:...' but sidecar_dir is not set")

    # -------------------------------------------------------------------------------------------------- plumbing
    def _rank_world(self) -> tuple[int, int]:
        rank, world = self._rank, self._world_size
        trainer = self.trainer
        if rank is None:
            rank = trainer.global_rank if trainer is not None else 0
        if world is None:
            world = trainer.world_size if trainer is not None else 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world_size {world}")
        return rank, world

    def _per_device_batch(self) -> int:
        """``batch_size``, or the device's share of ``global_batch_size`` once the Trainer (or override) is known."""
        if self.batch_size is None:
            trainer = self.trainer
            accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
            self.batch_size = per_device_batch(None, self.hparams.global_batch_size, self._rank_world()[1], accumulate)
        return self.batch_size

    @classmethod
    def validate_config(cls, args: dict[str, Any], run: RunContext) -> None:
        """Checks before anything is built (``experiments/validate.py``): the mix (p in [0, 1], weights), the batch
        against the world size, the sample limits, and that local shards and the sidecar folder exist."""
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
        settings = LoaderSettings.from_args({**defaults, **args})  # the mix, sources, sample limits and dedupe
        batch, global_batch = args.get("batch_size"), args.get("global_batch_size")
        per_device_batch(batch, global_batch, run.world_size, run.accumulate_grad_batches)
        for key in ("train_shards", "val_shards", "test_shards"):
            check_shards(key, args.get(key))
        if any(source.kind == "sidecar" for source in settings.sources):
            check_path("sidecar_dir", args.get("sidecar_dir"), "dir", what="per-shard sidecars (`sidecars` command)")

    def _transforms(self, stage: str) -> DataTransforms:
        provider = getattr(self.trainer.lightning_module if self.trainer else None, "data_transforms", None)
        found = provider(stage) if callable(provider) else DataTransforms()
        own = self.transforms
        return DataTransforms(
            image=own.image if own.image is not None else found.image,
            text=own.text if own.text is not None else found.text,
        )

    def _duplicate_index(self, urls: Sequence[str]) -> tuple[str, dict[str, Any]]:
        """The path and summary of the shards' duplicate index (``dedupe: global``), built first when missing or
        stale."""
        folder = self.hparams.dedupe_dir
        if not folder:
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            folder = os.path.join(cache, "recap_suite", "dedupe")
        name = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:24]
        path = os.path.join(os.fspath(folder), f"{name}.json")
        return path, ensure_duplicate_index(urls, path, self.settings.dedupe_max_keys, rank_zero_info)

    def prepare_data(self) -> None:
        """``dedupe: global``: build the duplicate index of every shard list once per node, before ``setup``."""
        if self.settings.dedupe != "global":
            return
        for spec in (self.train_shards, self.val_shards, self.test_shards):
            if spec is not None:
                self._duplicate_index(expand_urls(spec))

    def setup(self, stage: str) -> None:
        self._per_device_batch()  # before the LightningModule's setup, which may read batch_size (ClipModule)
        trainer = self.trainer
        if trainer is not None and self.hparams.skip_log is True:
            self._log_dir = trainer.log_dir  # here, where every rank calls it (it is a broadcast from rank 0)
        if trainer is not None and stage == "fit":
            add_monitor(trainer)

    def _stream(self, shards: str | list[str], stage: str, training: bool) -> CaptionMixStream:
        urls = expand_urls(shards)
        rank, world = self._rank_world()
        self._per_device_batch()
        batches, (index_path, index) = None, (None, None)
        if self.settings.dedupe == "global":
            index_path, index = self._duplicate_index(urls)
        workers = max(1, self.hparams.num_workers)
        if training:
            if self.hparams.train_num_samples is not None:
                n = self.hparams.train_num_samples
            else:  # the shards' sample counts include the copies that the global index drops
                n = count_samples(urls) - (index["copies"] if index is not None else 0)
            batches = n // (self.batch_size * world)
            if batches < 1:
                raise ValueError(
                    f"{n} training samples give no full batch of {self.batch_size} x {world} ranks; lower batch_size"
                )
            if not self.settings.resampled and len(urls) < world * workers:
                raise ValueError(
                    f"{len(urls)} shards < {world} ranks x {workers} workers: every worker needs a "
                    f"shard; use fewer workers, more shards, or resampled=True"
                )
        return CaptionMixStream(
            urls,
            self.settings,
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            batches_per_rank=batches,
            transforms=self._transforms(stage),
            epoch=self.epoch if training else 0,
            dedupe_index=index_path,
        )

    def _skip_log_path(self) -> Path | None:
        """This rank's skip log file (see ``skip_log``), or None."""
        skip_log = self.hparams.skip_log
        if skip_log is True:
            if self._log_dir is None and self.trainer is not None:
                self._log_dir = self.trainer.log_dir
            skip_log = None if self._log_dir is None else Path(self._log_dir) / "skipped.jsonl"
        if skip_log is None or skip_log is False:
            return None
        path, rank = Path(skip_log), self._rank_world()[0]
        return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")

    def _loader(self, shards: str | list[str], stage: str, split: str) -> CaptionMixLoader:
        training, workers = split == "train", self.hparams.num_workers
        return CaptionMixLoader(
            self._stream(shards, stage, training),
            split=split,
            skip_log=self._skip_log_path(),
            num_workers=workers,
            persistent_workers=training and self.hparams.persistent_workers and workers > 0,
            pin_memory=self.hparams.pin_memory,
            prefetch_factor=2 if workers > 0 else None,
        )

    def train_dataloader(self) -> CaptionMixLoader:
        self.epoch._shared()  # create the shared value before workers start, so they all see set_epoch
        return self._loader(self.train_shards, "fit", "train")

    def val_dataloader(self) -> CaptionMixLoader | list:
        return [] if self.val_shards is None else self._loader(self.val_shards, "validate", "val")

    def test_dataloader(self) -> CaptionMixLoader | list:
        return [] if self.test_shards is None else self._loader(self.test_shards, "test", "test")

    def set_epoch(self, epoch: int) -> None:
        """For plain training loops (Lightning calls the loader's sampler instead)."""
        self.epoch.set(epoch)


def resolve_weights(
    names: list[str], p_original: float | None, source_weights: dict[str, float] | None, mix: str
) -> dict[str, float]:
    """Turn ``p_original`` / ``source_weights`` into validated probabilities over the named sources."""
    if len(set(names)) != len(names):
        raise ValueError(f"caption source names must be unique, got {names}")
    if p_original is not None and source_weights is not None:
        raise ValueError("set either p_original or source_weights, not both")
    if p_original is not None:
        if not 0.0 <= p_original <= 1.0:
            raise ConfigError("p_original", p_original, "must be in [0, 1]")
        if "original" not in names or len(names) != 2:
            raise ValueError(
                f"p_original needs exactly two caption sources, one named 'original'; got {names} "
                f"(use source_weights for other layouts)"
            )
        return {n: (p_original if n == "original" else 1.0 - p_original) for n in names}
    if source_weights is not None:
        unknown = sorted(set(source_weights) - set(names))
        if unknown:
            raise ValueError(f"source_weights name unknown caption sources {unknown}; sources are {names}")
        if any(w < 0 for w in source_weights.values()):
            raise ValueError(f"source_weights must be >= 0, got {source_weights}")
        total = sum(source_weights.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"source_weights must sum to 1, got {total} ({source_weights})")
        return {n: float(source_weights.get(n, 0.0)) for n in names}
    if len(names) == 1 or mix == "concat":
        return {n: 1.0 / len(names) for n in names}
    raise ValueError(f"{len(names)} caption sources {names}: set p_original (the paper's p) or source_weights")


__all__ = [
    "CaptionMixDataModule",
    "CaptionMixLoader",
    "CaptionMixStream",
    "DataTransforms",
    "count_samples",
    "expand_urls",
    "resolve_weights",
]
