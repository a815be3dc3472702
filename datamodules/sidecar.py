"""Per-shard recaption sidecars, the reader's side: ``<sidecar_dir>/<shard_stem>.parquet`` holds the column ``key``
(the sample key inside that shard's tar) and the recaption columns it was built with. The training DataModule reads
only the sidecar of the shard it is streaming. The batch job that writes them (``python -m experiments sidecars``)
is ``experiments/jobs/sidecars.py``.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from datamodules.formats import RECAP_V2_COLUMNS, RECAP_V2_SCHEMA

TAR_SUFFIX = re.compile(r"\.(tar|tgz|tar\.gz|tar\.bz2|tar\.xz|tar\.zst)$")


def sidecar_path(sidecar_dir: str | Path, shard_url: str) -> str:
    """The sidecar of a shard given as webdataset takes it (``/d/00012.tar``, ``s3://b/00012.tar``,
    ``https://h/00012.tar?sig=x``, ``pipe:aws s3 cp s3://b/00012.tar -``): ``<sidecar_dir>/00012.parquet``."""
    d = os.fspath(sidecar_dir)
    return f"{d}{'' if d.endswith('/') else '/'}{sidecar_stem(shard_url)}.parquet"


class UnreadableSidecarError(ValueError):
    """A sidecar file that exists but is not a readable parquet file (truncated copy, corrupt footer)."""


def read_sidecar(path: str | Path, columns: Sequence[str]) -> pa.Table:
    """One shard's sidecar as a table of ``key`` and ``columns`` (any type: ``re_condition_length`` is an int). A v2
    column (``formats.RECAP_V2_COLUMNS``) the file lacks reads as nulls: its build's recap files had none.

    Raises:
        FileNotFoundError: The sidecar does not exist (not built for this shard).
        UnreadableSidecarError: The file is not readable parquet; names the file.
        ValueError: The sidecar lacks one of ``columns`` (other than a v2 one); names the file and the column.
    """
    path = os.fspath(path)
    columns = list(columns)
    try:
        with fsspec.open(path, "rb") as f, pq.ParquetFile(f) as pf:
            names = pf.schema_arrow.names
            for col in ["key", *columns]:
                if col not in names and col not in RECAP_V2_COLUMNS:
                    raise ValueError(
                        f"sidecar {path} has no column {col!r} (it has {names}); rebuild the sidecars with "
                        f"build_sidecars(..., columns=[..., {col!r}], overwrite=True)"
                    )
            table = pf.read(columns=["key", *(c for c in columns if c in names)])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"sidecar {path} does not exist; build it with build_sidecars()") from e
    except (pa.ArrowException, OSError) as e:  # not parquet, truncated, bad footer or page (pyarrow's types)
        raise UnreadableSidecarError(f"sidecar {path} is not a readable parquet file: {e}") from e
    for col in columns:
        if col not in table.column_names:
            table = table.append_column(col, pa.nulls(table.num_rows, RECAP_V2_SCHEMA.field(col).type))
    return table.select(["key", *columns])


def load_sidecar(path: str | Path, columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One shard's sidecar as ``{key: {column: value}}`` (raises as :func:`read_sidecar`); samples without a
    recaption are absent."""
    data = read_sidecar(path, columns).to_pydict()
    keys = data.pop("key")
    values = [data[c] for c in columns]
    return {k: dict(zip(columns, row, strict=True)) for k, *row in zip(keys, *values, strict=True)}


def _expand_recap(recap: str | Path | list[str | Path]) -> list[str]:
    """Recap parquet files from paths, directories (recursive, no ``.``/``_`` names) and globs, each once, in order."""
    items = [recap] if isinstance(recap, str | os.PathLike) else list(recap)
    if not items:
        raise ValueError("no recap inputs given")
    out: list[str] = []
    for item in items:
        s = os.fspath(item)
        fs, path = fsspec.core.url_to_fs(s)
        if any(ch in path for ch in "*?["):
            found = sorted(p for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory")
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith(".parquet") and p.rsplit("/", 1)[-1][0] not in "._")
        elif fs.exists(path):
            found = [path]
        else:
            raise FileNotFoundError(f"recap input {s!r} does not exist")
        if not found:
            raise FileNotFoundError(f"recap input {s!r} matches no parquet files")
        local = "://" not in s or s.startswith("file://")
        out.extend(p if local else fs.unstrip_protocol(p) for p in found)
    return list(dict.fromkeys(out))


def strip_query(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0] if "://" in url else url


def shard_location(url: str) -> str:
    """The tar's own path/URL (the source inside a ``pipe:`` command)."""
    if not url.startswith("pipe:"):
        return url
    for token in shlex.split(url[len("pipe:") :]):
        if TAR_SUFFIX.search(strip_query(token)):
            return token
    raise ValueError(f"cannot find a .tar path in the pipe URL {url!r}")


def sidecar_stem(url: str) -> str:
    base = strip_query(shard_location(url)).rstrip("/").rsplit("/", 1)[-1]
    stem = TAR_SUFFIX.sub("", base)
    if stem == base:
        stem = os.path.splitext(base)[0]
    if not stem:
        raise ValueError(f"cannot derive a shard name from {url!r}")
    return stem
