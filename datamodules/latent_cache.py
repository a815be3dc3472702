"""The DiT's cache: VAE latents (or pixels) and frozen-text-encoder features of **every caption source** of every image,
written once by a resumable pre-pass, read by ``LatentCacheDataModule`` so training steps are pure DiT compute.

Layout: ``<cache>/<shard stem>.safetensors`` per input shard with tensors ``latent`` (N×C×H×W), and per source
``text.<name>`` (N×L×D, zero beyond the mask), ``mask.<name>`` (N×L, uint8) and ``has.<name>`` (N, uint8: the
source had a caption); the keys and sources are in its metadata. ``<cache>/_cache.json`` holds what made it (text
encoder, length, VAE, image size, sources, dtype); a cache is refused by a model that would have made it differently.
Each shard file is written atomically, so a killed pre-pass redoes only unfinished shards. Every source is cached, so
the paper's p is still drawn per sample and epoch by ``ChooseCaption``, as uncached: the two paths see the same
caption choices. Sizes and the benchmark: ``docs/dit.md`` ("Data: uncached and cached, same draws").
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.caption_mix import DEFAULT_SOURCES, POSITION_KEY, SharedEpoch, resolve_weights, worker_resume_point
from datamodules.io import atomic_write
from datamodules.wds_stages import ChooseCaption, SampleLimits, SkipStats, SourceSpec, stable_int

CACHE_CONFIG = "_cache.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cache_signature(
    module: Any, sources: Mapping[str, str], dtype: str, limits: SampleLimits | None = None
) -> dict[str, Any]:
    """What determines a cache's content: a model with another signature must not read it."""
    h = module.hparams
    return {
        "format_version": 1,
        "text_encoder": str(h.text_encoder),
        "text_max_length": module.text_encoder.max_length,
        "vae": h.vae,
        "vae_subfolder": h.vae_subfolder,
        "image_size": h.image_size,
        "sources": dict(sources),
        "dtype": dtype,
        "sample_limits": (limits or SampleLimits()).as_dict(),
    }


LEGACY_SIGNATURE = {"sample_limits": SampleLimits().as_dict()}
"""What a cache written before a signature key existed was made with (the limits were fixed in that code)."""


def _check_signature(cache: Path, want: Mapping[str, Any]) -> None:
    path = cache / CACHE_CONFIG
    if not path.exists():
        return
    have = {**LEGACY_SIGNATURE, **json.loads(path.read_text())}
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if diff:
        raise ValueError(f"{path}: the cache was made differently ({diff}: cached, wanted); use another folder")


def build_cache(
    module: Any,
    shards: str | Sequence[str],
    out: str | os.PathLike,
    sources: Mapping[str, str] | None = None,
    sidecar_dir: str | None = None,
    batch_size: int = 64,
    dtype: str = "float16",
    rank: int = 0,
    world_size: int = 1,
    limits: SampleLimits | None = None,
) -> dict[str, int]:
    """Cache every shard of ``shards`` not yet in ``out`` (this rank's share: every ``world_size``-th in name order).

    ``module``: a ``DiTModule`` (its text encoder, codec and image transform make the cache). Samples the uncached
    path would skip (no image, undecodable, outside ``limits``: the DataModule's ``SampleLimits``, default values
    when None) are skipped and counted; samples without any caption are kept (each source's ``has`` says which
    exist). The limits are part of the cache's signature."""
    from safetensors.torch import save_file

    from datamodules.shards import expand_urls, shard_stem
    from datamodules.wds_stages import CountingHandler, ReadShards

    limits = limits if limits is not None else SampleLimits()
    sources = dict(sources or DEFAULT_SOURCES)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module.configure_model()
    signature = cache_signature(module, sources, dtype, limits)
    _check_signature(out, signature)
    (out / CACHE_CONFIG).write_text(json.dumps(signature, indent=2))
    specs = [SourceSpec.parse(n, s) for n, s in sources.items()]
    urls = sorted(expand_urls(shards), key=shard_stem)
    todo = [u for u in urls if not (out / f"{shard_stem(u)}.safetensors").exists()][rank::world_size]
    transform = module.data_transforms("fit").image
    cast = _DTYPES[dtype]
    totals = {"shards": 0, "samples": 0, "skipped": 0, "skipped_shards": len(urls) - len(todo)}
    for url in todo:
        stats = SkipStats(max_consecutive_drops=None)
        stream = ReadShards(CountingHandler(stats))([{"url": url}])
        stream = limits.extract(specs, sidecar_dir, stats)(stream)
        samples = list(limits.decode(transform, stats)(stream))
        keys = [s["key"] for s in samples]
        tensors: dict[str, list[torch.Tensor]] = {"latent": []}
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            images = torch.stack([s["image"] for s in chunk])
            tensors["latent"].append(module.encode_images(images).to(cast).cpu())
            for spec in specs:
                texts = [s["captions"].get(spec.name) or "" for s in chunk]
                emb, mask = module.encode_text(texts)
                tensors.setdefault(f"text.{spec.name}", []).append(emb.to(cast).cpu())
                tensors.setdefault(f"mask.{spec.name}", []).append(mask.to(torch.uint8).cpu())
                has = torch.tensor([bool(s["captions"].get(spec.name)) for s in chunk], dtype=torch.uint8)
                tensors.setdefault(f"has.{spec.name}", []).append(has)
        if not samples:
            stats.skip("empty_shard", url)
        joined = {k: torch.cat(v).contiguous() for k, v in tensors.items() if v}
        meta = {"keys": keys, "sources": list(sources), "skipped": dict(stats.counts)}
        meta = {k: json.dumps(v) for k, v in meta.items()} | {"url": url}
        atomic_write(out / f"{shard_stem(url)}.safetensors", functools.partial(save_file, joined, metadata=meta))
        totals["shards"] += 1
        totals["samples"] += len(samples)
        totals["skipped"] += sum(stats.counts.values())
    return totals


class _CacheIndex:
    """Keys, sources and lazily opened (memory-mapped) shard files of a cache folder."""

    def __init__(self, cache_dir: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(cache_dir)
        cfg = self.dir / CACHE_CONFIG
        if not cfg.exists():
            raise FileNotFoundError(
                f"{cfg} is missing: not a DiT cache (make one with `python -m experiments dit-cache`)"
            )
        self.config = json.loads(cfg.read_text())
        self.files = sorted(p for p in self.dir.glob("*.safetensors") if not p.name.startswith("."))
        if not self.files:
            raise FileNotFoundError(f"{self.dir} holds no cached shards (*.safetensors)")
        self.items: list[tuple[int, int]] = []  # (file index, row)
        self.keys: list[str] = []
        self.has: dict[str, list[bool]] = {}
        for fi, path in enumerate(self.files):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                keys = json.loads(meta["keys"])
                for name in json.loads(meta["sources"]):
                    self.has.setdefault(name, []).extend(bool(x) for x in f.get_tensor(f"has.{name}").tolist())
            self.items += [(fi, r) for r in range(len(keys))]
            self.keys += keys
        self.sources = list(self.config["sources"])
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def handle(self, fi: int) -> Any:
        from safetensors import safe_open

        if fi not in self._open:
            if len(self._open) >= 64:  # bound open files
                self._open.pop(next(iter(self._open)))
            self._open[fi] = safe_open(str(self.files[fi]), framework="pt")
        return self._open[fi]

    def get(self, i: int, source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fi, r = self.items[i]
        f = self.handle(fi)
        return f.get_slice("latent")[r], f.get_slice(f"text.{source}")[r], f.get_slice(f"mask.{source}")[r]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # file handles do not travel to loader workers


@dataclass(eq=False)
class LatentCacheStream(IterableDataset):
    """Batches from a cache: per epoch a seeded permutation of all samples, split evenly over ranks (equal batch
    counts, so DDP never waits on a rank) and then over loader workers; each sample's caption source drawn by
    ``ChooseCaption`` (the uncached DataModule's rule) among the sources it has. ``training``: shuffled, full batches
    only, and resumable mid-epoch through ``CaptionMixLoader``'s state (the position is a batch index here, so
    resuming costs no reading); else one pass in order, the last batch partial."""

    index: _CacheIndex
    batch_size: int
    weights: Mapping[str, float]
    seed: int
    epoch: SharedEpoch
    rank: int
    world_size: int
    training: bool
    fallback: bool = True
    resume: dict[str, Any] | None = field(default=None, init=False)  # set by CaptionMixLoader for one iteration

    def current_epoch(self) -> int:
        return self.epoch.get()

    def __len__(self) -> int:
        # Training streams are sized, so Lightning does not prefetch a batch ahead: the loader's count of handed-out
        # batches (its resume state) then equals the batches trained on.
        if not self.training:
            raise TypeError("an evaluation stream has no length")
        return len(self.index) // self.world_size // self.batch_size

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.index)
        order = list(range(n))
        if self.training:
            random.Random(stable_int("latent-cache", self.seed, epoch)).shuffle(order)
        per_rank = n // self.world_size if self.training else -(-n // self.world_size)
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        out = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        return [b for b in out if len(b) == self.batch_size] if self.training else out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch.get()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = SkipStats(max_consecutive_drops=None)
        choose = ChooseCaption(self.weights, self.seed, epoch, stats, fallback=self.fallback)
        resume, self.resume = self.resume, None
        start = 0
        if resume is not None and self.training:  # training: resume past this worker's consumed batches (no I/O)
            wid, done, position = worker_resume_point(resume, wid, nw)
            start = position if position is not None else done
        mine = self.batches(epoch)[wid::nw]
        for j in range(start, len(mine)):
            b = mine[j]
            rows, names, keys = [], [], []
            for i in b:
                key = self.index.keys[i]
                present = {s: ("x" if self.index.has[s][i] else None) for s in self.index.sources}
                _, name = choose.choose(key, present)
                if name is None:
                    stats.skip("no_caption", key)
                    continue
                rows.append(self.index.get(i, name))
                names.append(name)
                keys.append(key)
            if not rows:
                continue
            lat, text, mask = (torch.stack(x) for x in zip(*rows, strict=True))
            batch = {"latent": lat, "text": text, "text_mask": mask, "caption_source": names, "key": keys}
            batch["skipped"] = stats.drain()
            if self.training:
                batch[POSITION_KEY] = (wid, j + 1)  # batches of this worker's list passed (an empty one is skipped)
            yield batch


class LatentCacheDataModule(L.LightningDataModule):
    """Training batches from a DiT cache (``python -m experiments dit-cache``), caption sources mixed at p.

    Args:
        cache_dir: The cache folder.
        batch_size: Per-device batch size.
        p_original: The paper's p (probability of the ``original`` source); or ``source_weights``.
        source_weights: Probabilities over the cached sources.
        val_cache_dir: An optional cache of validation shards (one pass, no shuffling, epoch-0 caption draws).
        num_workers: Loader workers per rank.
        seed: Seed of the sample order and the caption draws (the same draws as ``CaptionMixDataModule``'s).
        fallback: A sample without its drawn source uses another one (else it is skipped).
    """

    def __init__(
        self,
        cache_dir: str,
        batch_size: int,
        p_original: float | None = None,
        source_weights: dict[str, float] | None = None,
        val_cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        fallback: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.epoch = SharedEpoch(0)

    @classmethod
    def validate_config(cls, args: dict[str, Any], run: Any) -> None:
        """Checks before anything is built (``experiments/validate.py``): both caches exist (their ``_cache.json``),
        the batch, and p / weights against the cached sources."""
        from datamodules.checks import ConfigError, per_device_batch

        per_device_batch(args.get("batch_size"), None, run.world_size)
        for key in ("cache_dir", "val_cache_dir"):
            if args.get(key) is not None and not (Path(args[key]) / CACHE_CONFIG).is_file():
                raise ConfigError(key, args[key], f"must be a DiT cache (with {CACHE_CONFIG}; `experiments dit-cache`)")
        sources = json.loads((Path(args["cache_dir"]) / CACHE_CONFIG).read_text()).get("sources") or DEFAULT_SOURCES
        resolve_weights(list(sources), args.get("p_original"), args.get("source_weights"), "sample")

    def setup(self, stage: str) -> None:
        if self.trainer is not None and stage == "fit":
            from datamodules.monitor import add_monitor

            add_monitor(self.trainer)

    def _loader(self, path: str, training: bool) -> DataLoader:
        from datamodules.caption_mix import CaptionMixLoader

        hp, trainer, index = self.hparams, self.trainer, _CacheIndex(path)
        weights = resolve_weights(index.sources, hp.p_original, hp.source_weights, "sample")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        epoch = self.epoch if training else SharedEpoch(0)
        stream = LatentCacheStream(index, hp.batch_size, weights, hp.seed, epoch, rank, world, training, hp.fallback)
        return CaptionMixLoader(stream, num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0 and training)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.cache_dir, training=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.hparams.val_cache_dir, training=False) if self.hparams.val_cache_dir else []
