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
