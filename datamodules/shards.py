"""Shard specs -> shard URLs, shared by the DataModule and the sidecar builder (light: no torch import)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from braceexpand import braceexpand


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard specs: brace patterns, ``::``-separated lists (open_clip), globs, directories of ``*.tar``,
    fsspec URLs and ``pipe:`` commands (passed through)."""
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    urls: list[str] = []
    for item in items:
        for part in os.fspath(item).split("::"):
            for url in braceexpand(part):
                if url.startswith("pipe:") or "://" in url:
                    urls.append(url)
                elif os.path.isdir(url):
                    urls.extend(sorted(glob.glob(os.path.join(url, "*.tar"))))
                elif any(c in url for c in "*?["):
                    urls.extend(sorted(glob.glob(url)))
                else:
                    urls.append(url)
    if not urls:
        raise ValueError(f"no shards match {spec!r}")
    return urls


def shard_stem(url: str) -> str:
    """A shard's file name without ``.tar`` (img2dataset's shard stems are unique): the name of its per-shard outputs
    (recaption parquets, sidecars, DiT cache files)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".tar")] if name.endswith(".tar") else name


def rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's (rank, world size) for splitting offline jobs: the arguments, else torchrun's ``RANK`` /
    ``WORLD_SIZE``, else SLURM's ``SLURM_PROCID`` / ``SLURM_NTASKS``, else (0, 1)."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))) if world_size is None else world_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world_size {world}")
    return rank, world


def local_rank() -> int:
    """The process's index on its node (torchrun's ``LOCAL_RANK``, SLURM's ``SLURM_LOCALID``): which GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
