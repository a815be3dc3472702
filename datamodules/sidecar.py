"""Per-shard recaption sidecars: join a Recap-DataComp-1B style table onto img2dataset webdataset shards.

The released recaptions (HF ``UCSC-VLAA/Recap-DataComp-1B``, PAPER.md §7) are a separate parquet table of 1.24 B rows
in ~3,550 files whose order has nothing to do with the image shards. :func:`build_sidecars` is a one-off, resumable,
bounded-memory pass that writes one small parquet file per image shard, ``OUT/<shard_stem>.parquet``, with the
column ``key`` (the sample key inside that shard's tar) plus the requested caption columns. The training DataModule
then reads only the sidecar of the shard it is streaming (:func:`sidecar_path`, :func:`load_sidecar`).

Algorithm (an external hash join; at most about one bucket of rows is in memory at a time):

1. **Recap partition.** The recap files are planned into *units* of whole row groups (about one bucket of rows
   each). Each unit is streamed with ``ParquetFile.iter_batches``, every row gets ``bucket = crc32(join value) %
   num_buckets`` (stable across processes, platforms and runs), and the unit is written to ``WORK/recap/uNNNNNN.arrow``
   as an Arrow IPC file holding exactly ``num_buckets`` record batches, batch ``b`` being the rows of bucket ``b``.
2. **Shard index.** Each shard's samples (key, join value) come from the img2dataset ``<stem>.parquet`` next to the
   tar (rows with ``status == "success"`` only), else from streaming the tar's ``.json`` members. Shards are grouped
   into units the same way and written to ``WORK/index/uNNNNNN.arrow`` (one batch per bucket).
3. **Join.** For each bucket, batch ``b`` of every recap unit and every index unit is read (random access), each
   shard sample is matched to the first recap row with its join value (a hash lookup, ``pyarrow.compute.index_in``,
   then a ``take`` of the matched captions) and the result is written to
   ``WORK/joined/bNNNNN.arrow`` with one record batch per *shard group* (consecutive shards holding about one bucket
   of samples).
4. **Write.** For each shard group, batch ``g`` of every joined bucket is read, sorted by (shard, key), and one
   sidecar per shard is written atomically (temporary file + ``os.replace``). Every shard gets a sidecar, possibly
   with zero rows, so a reader can tell "no recaption" from "not built".

``OUT/_manifest.json`` records the configuration, the plan, per-pass progress and running counters; it is rewritten
atomically after every unit, bucket and group. A rerun after a crash resumes at the first unfinished unit, bucket or
shard group (shards whose sidecar already exists are not rewritten); a rerun after completion is a no-op; a rerun
with different inputs, ``join_on`` or ``columns`` raises (``overwrite=True`` rebuilds from scratch). Runs on the same
``out_dir`` must not be concurrent.

Join semantics:

* ``join_on="key"``: our own recaption job keeps the shard keys. ``"sha256"``: sha256 of the image bytes, the robust
  way to map the released table onto one's own DataComp download (compared case-insensitively, whitespace stripped).
  ``"url"``: exact string match (the released URLs can differ by query string, PAPER.md §7).
* **Recap duplicates** (the released table repeats some sha256 values, e.g. error images): the *first* row in input
  order wins (files in the order given, globs and directories sorted, rows in file order); the others are counted in
  ``recap_duplicates``.
* **Shard-side duplicates**: if several samples share a join value (identical images when joining on sha256), each of
  them gets that recaption. A key repeated inside one shard is written once (counted in ``shard_duplicate_keys``).
* Null or empty join values are skipped on both sides and counted (``recap_null_join``, ``shard_null_join``).

Memory is bounded by about one bucket (``num_buckets=None`` picks ~1 M recap rows per bucket), or by the largest
row group of a recap file or the largest single shard when those are bigger. Scratch space under ``work_dir`` is
roughly the compressed size of the selected recap columns; it is deleted after a successful build unless
``keep_work=True``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import tarfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlparse

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datamodules.io import atomic_write
from datamodules.shards import expand_urls

__all__ = [
    "JOIN_COLUMNS",
    "MANIFEST_NAME",
    "RECAP_COLUMNS",
    "UnreadableSidecarError",
    "build_sidecars",
    "bucket_of",
    "load_sidecar",
    "main",
    "sidecar_path",
]

log = logging.getLogger(__name__)

RECAP_COLUMNS: tuple[str, ...] = (
    "url",
    "re_caption",
    "org_caption",
    "sha256",
    "key",
    "re_clip_score",
    "org_clip_score",
    "re_length",
    "org_length",
    "re_gpt4v_score",
    "org_gpt4v_score",
)
"""Columns of the paper-era Recap-DataComp-1B schema (later versions add ``re_caption_condition_diverse_topk`` and
``re_condition_length``). Only ``join_on`` and the requested ``columns`` are required; anything else is ignored."""

JOIN_COLUMNS: tuple[str, ...] = ("key", "sha256", "url")
MANIFEST_NAME = "_manifest.json"
INPUTS_NAME = "_inputs.json"
TARGET_BUCKET_ROWS = 1_000_000
"""Recap rows per bucket when ``num_buckets`` is None (also the size of pass-1/2 units and pass-4 groups)."""

_FORMAT_VERSION = 1
_J, _SHARD, _KEY, _ORD = "__j", "__shard", "__key", "__ord"
_TAR_SUFFIX = re.compile(r"\.(tar|tgz|tar\.gz|tar\.bz2|tar\.xz|tar\.zst)$")
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: KEY.ext -> (KEY, ext)
_GOPEN_SCHEMES = frozenset({"pipe", "http", "https", "sftp", "ftps", "scp", "gs", "htgs", "hf", "ais"})
_WORK_ENTRIES = ("recap", "index", "joined", "plan.json")
_IO_WORKERS = 8  # threads reading shard indices and recap footers ahead (I/O latency, not CPU)
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(
    compression="zstd" if pa.Codec.is_available("zstd") else ("lz4" if pa.Codec.is_available("lz4") else None)
)


# ----------------------------------------------------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------------------------------------------------


def sidecar_path(sidecar_dir: str | Path, shard_url: str) -> str:
    """Return the sidecar file of a shard: ``<sidecar_dir>/<stem>.parquet``.

    Args:
        sidecar_dir: Directory (local path or URL) the sidecars were written to.
        shard_url: Shard path or URL as given to webdataset, e.g. ``/d/00012.tar``, ``s3://b/00012.tar``,
            ``https://h/00012.tar?sig=x`` or ``pipe:aws s3 cp s3://b/00012.tar -``.

    Returns:
        The sidecar path, e.g. ``<sidecar_dir>/00012.parquet``.
    """
    d = os.fspath(sidecar_dir)
    return f"{d}{'' if d.endswith('/') else '/'}{_shard_stem(shard_url)}.parquet"


class UnreadableSidecarError(ValueError):
    """A sidecar file that exists but is not a readable parquet file (truncated copy, corrupt footer)."""


def load_sidecar(path: str | Path, columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Load one shard's sidecar as ``{key: {column: value}}``.

    Args:
        path: Sidecar file (local path or fsspec URL), see :func:`sidecar_path`.
        columns: Caption columns to return, e.g. ``["re_caption"]``.

    Returns:
        Mapping from the shard's sample key to its requested column values (strings, numbers or None). Samples of
        the shard without a recaption are absent.

    Raises:
        FileNotFoundError: If the sidecar does not exist (the sidecars were not built for this shard).
        UnreadableSidecarError: If the file is not a readable parquet file (a ``ValueError``); names the file.
        ValueError: If the sidecar lacks one of ``columns``; the message names the file and the column. Extra
            columns are ignored.
    """
    path = os.fspath(path)
    columns = list(columns)
    try:
        with _open_input(path) as f, pq.ParquetFile(f) as pf:
            names = pf.schema_arrow.names
            for col in ["key", *columns]:
                if col not in names:
                    raise ValueError(
                        f"sidecar {path} has no column {col!r} (it has {names}); rebuild the sidecars with "
                        f"build_sidecars(..., columns=[..., {col!r}], overwrite=True)"
                    )
            data = pf.read(columns=["key", *columns]).to_pydict()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"sidecar {path} does not exist; build it with build_sidecars()") from e
    except (pa.ArrowException, OSError) as e:  # not parquet, truncated, bad footer or page (pyarrow's types)
        raise UnreadableSidecarError(f"sidecar {path} is not a readable parquet file: {e}") from e
    keys = data.pop("key")
    values = [data[c] for c in columns]
    return {k: dict(zip(columns, row, strict=True)) for k, *row in zip(keys, *values, strict=True)}


def bucket_of(value: str, num_buckets: int) -> int:
    """Bucket of one (normalised) join value: ``crc32(utf-8 bytes) % num_buckets``, stable across runs and hosts."""
    return zlib.crc32(value.encode("utf-8")) % num_buckets


# ----------------------------------------------------------------------------------------------------------------------
# build_sidecars
# ----------------------------------------------------------------------------------------------------------------------


def build_sidecars(
    recap: str | Path | Sequence[str | Path],
    shards: str | Sequence[str],
    out_dir: str | Path,
    *,
    join_on: Literal["key", "sha256", "url"] = "key",
    columns: Sequence[str] = ("re_caption",),
    num_buckets: int | None = None,
    work_dir: str | Path | None = None,
    batch_rows: int = 65536,
    progress: bool = True,
    overwrite: bool = False,
    keep_work: bool = False,
) -> dict:
    """Write one recaption sidecar ``OUT/<shard_stem>.parquet`` per image shard (see the module docstring).

    Args:
        recap: Recap parquet files, directories (searched recursively for ``*.parquet``) or glob patterns; local
            paths or fsspec URLs. Files are processed in the given order, each glob or directory sorted.
        shards: Shard tar paths/URLs or brace patterns (``/d/{00000..00009}.tar``; ``::`` separates patterns).
        out_dir: Local directory for the sidecars and ``_manifest.json``. Must not be the shards' directory (the
            img2dataset ``<stem>.parquet`` files live there).
        join_on: Column joining recap rows to shard samples: ``key``, ``sha256`` or ``url``.
        columns: Recap columns to copy into the sidecars (each is required in every recap file). ``key`` is always
            written (the shard's sample key) and cannot be requested.
        num_buckets: Number of hash buckets; None chooses ``ceil(recap_rows / 1M)``. Ignored when resuming.
        work_dir: Local scratch directory for the partitions; default ``OUT/_work``. Only the entries this function
            creates there (``recap/``, ``index/``, ``joined/``, ``plan.json``) are ever deleted.
        batch_rows: Rows per record batch when streaming recap parquet files.
        progress: Print progress lines to stderr.
        overwrite: Discard whatever a previous build left in ``out_dir`` (sidecars, manifest, scratch) and rebuild
            from scratch, instead of resuming it or refusing a different configuration.
        keep_work: Keep ``work_dir`` after a successful build (it is deleted by default).

    Returns:
        Summary dict. Counts of the whole build: ``shards``, ``shard_samples``, ``rows_matched`` (sidecar rows),
        ``shard_samples_without_recap``, ``shard_null_join``, ``shard_duplicate_keys``, ``shards_from_parquet``,
        ``shards_from_tar_scan``, ``recap_rows``, ``recap_null_join``, ``recap_duplicates``, ``recap_rows_unmatched``
        (recap rows matching no shard sample, after de-duplication), ``num_buckets``. Of this call:
        ``shards_written``, ``shards_skipped`` (written by an earlier, interrupted call), ``peak_rows`` (largest table
        materialised per pass), ``elapsed_s``, ``resumed``, ``noop``.

    Raises:
        ValueError: On a bad argument, a recap file missing a required column (naming the file and the column), a
            shard index without the join column, duplicate shard stems, or a configuration that differs from an
            existing build in ``out_dir`` (unless ``overwrite``).
        FileNotFoundError: If a recap pattern matches nothing.
    """
    t_start = time.time()
    say = _Progress(progress)
    if join_on not in JOIN_COLUMNS:
        raise ValueError(f"join_on must be one of {JOIN_COLUMNS}, got {join_on!r}")
    columns = list(columns)
    if len(set(columns)) != len(columns):
        raise ValueError(f"duplicate names in columns={columns}")
    if "key" in columns or any(c.startswith("__") for c in columns):
        raise ValueError(f"columns={columns}: 'key' is always the shard sample key and cannot be requested")
    if num_buckets is not None and num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")

    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out / "_work"
    recap_files = _expand_recap(recap)
    shard_urls = _expand_shards(shards)
    stems = [_shard_stem(u) for u in shard_urls]
    _check_stems(stems, shard_urls)
    _check_out_dir(out, shard_urls)
    config = {
        "format": _FORMAT_VERSION,
        "join_on": join_on,
        "columns": columns,
        "recap_files": len(recap_files),
        "recap_sha1": _sha1(recap_files),
        "shards": len(shard_urls),
        "shards_sha1": _sha1(shard_urls),
    }

    out.mkdir(parents=True, exist_ok=True)
    manifest = None if overwrite else _read_json(out / MANIFEST_NAME)
    if manifest is not None and manifest.get("config") != config:
        old = manifest.get("config", {})
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise ValueError(
            f"{out / MANIFEST_NAME} was built with a different configuration (differs in {diff}: "
            f"{ {k: old.get(k) for k in diff} } vs { {k: config.get(k) for k in diff} }); "
            "use another out_dir or pass overwrite=True to rebuild"
        )

    if manifest is not None and manifest["progress"]["complete"]:
        missing = [s for s in stems if not (out / f"{s}.parquet").exists()]
        if missing:
            raise RuntimeError(
                f"{out / MANIFEST_NAME} says the build is complete but {len(missing)} sidecars are missing "
                f"(e.g. {missing[0]}.parquet); rerun with overwrite=True"
            )
        say(f"sidecars in {out} are complete; nothing to do")
        summary = dict(manifest["summary"])
        summary.update(
            shards_written=0,
            shards_skipped=len(stems),
            resumed=False,
            noop=True,
            elapsed_s=round(time.time() - t_start, 3),
            peak_rows={},
        )
        return summary

    resumed = manifest is not None and (work / "plan.json").exists()
    if not resumed:
        if manifest is None and not overwrite:
            stray = [s for s in stems if (out / f"{s}.parquet").exists()]
            if stray:
                raise ValueError(
                    f"{out} already holds {len(stray)} sidecar-named files (e.g. {stray[0]}.parquet) but no "
                    f"{MANIFEST_NAME}; use another out_dir or pass overwrite=True"
                )
        _discard_build(out, work, stems)
        say(f"planning: {len(recap_files)} recap files, {len(shard_urls)} shards, join_on={join_on}")
        plan = _plan(recap_files, join_on, columns, num_buckets, batch_rows)
        work.mkdir(parents=True, exist_ok=True)
        _write_json(out / INPUTS_NAME, {"recap_files": recap_files, "shards": shard_urls, "stems": stems})
        _write_json(work / "plan.json", plan)
        manifest = {
            "config": config,
            "plan": {k: plan[k] for k in ("num_buckets", "unit_rows", "recap_rows")} | {"units": len(plan["units"])},
            "progress": {
                "recap_units_done": 0,
                "index_units": [],
                "group_starts": None,
                "buckets_done": 0,
                "groups_done": 0,
                "complete": False,
            },
            "stats": dict.fromkeys(_STAT_KEYS, 0),
            "summary": None,
        }
        _write_json(out / MANIFEST_NAME, manifest)
    else:
        plan = _read_json(work / "plan.json")
        say(f"resuming build in {out}: {json.dumps(manifest['progress'], default=str)[:200]}")
        if num_buckets is not None and num_buckets != plan["num_buckets"]:
            log.warning("resuming with the stored num_buckets=%d (ignoring %d)", plan["num_buckets"], num_buckets)

    ctx = _Ctx(
        out=out,
        work=work,
        manifest=manifest,
        plan=plan,
        recap_files=recap_files,
        shard_urls=shard_urls,
        stems=stems,
        join_on=join_on,
        columns=columns,
        batch_rows=batch_rows,
        say=say,
    )
    _pass1_recap(ctx)
    _pass2_index(ctx)
    _pass3_join(ctx)
    _pass4_write(ctx)

    st = manifest["stats"]
    summary = {
        "out_dir": str(out),
        "join_on": join_on,
        "columns": columns,
        "num_buckets": plan["num_buckets"],
        "shards": len(stems),
        "shards_written": ctx.written,
        "shards_skipped": len(stems) - ctx.written,
        "shard_samples": st["shard_samples"],
        "rows_matched": st["rows_matched"],
        "shard_samples_without_recap": st["shard_samples"] - st["rows_matched"],
        "shard_null_join": st["shard_null_join"],
        "shard_duplicate_keys": st["shard_duplicate_keys"],
        "shards_from_parquet": st["shards_from_parquet"],
        "shards_from_tar_scan": st["shards_from_tar_scan"],
        "recap_files": len(recap_files),
        "recap_rows": st["recap_rows"],
        "recap_null_join": st["recap_null_join"],
        "recap_duplicates": st["recap_duplicates"],
        "recap_rows_unmatched": st["recap_rows_unmatched"],
    }
    manifest["summary"] = summary
    manifest["progress"]["complete"] = True
    _write_json(out / MANIFEST_NAME, manifest)
    if not keep_work:
        _clear_work(work)
    summary = dict(summary, resumed=resumed, noop=False, peak_rows=ctx.peak, elapsed_s=round(time.time() - t_start, 3))
    say(
        f"done in {summary['elapsed_s']:.1f}s: {summary['rows_matched']:,} rows matched, "
        f"{summary['shard_samples_without_recap']:,} shard samples without recaption, "
        f"{summary['recap_rows_unmatched']:,} recap rows unmatched, {summary['recap_duplicates']:,} duplicates"
    )
    return summary


_STAT_KEYS = (
    "recap_rows",
    "recap_null_join",
    "recap_duplicates",
    "recap_rows_unmatched",
    "shard_samples",
    "shard_null_join",
    "shards_from_parquet",
    "shards_from_tar_scan",
    "rows_matched",
    "shard_duplicate_keys",
)


class _Ctx:
    """State shared by the four passes."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
        self.written = 0
        self.peak: dict[str, int] = {}

    def observe(self, name: str, rows: int) -> None:
        self.peak[name] = max(self.peak.get(name, 0), int(rows))

    def save(self, stats: dict[str, int] | None = None) -> None:
        for k, v in (stats or {}).items():
            self.manifest["stats"][k] += int(v)
        _write_json(self.out / MANIFEST_NAME, self.manifest)


class _Progress:
    """Rate-limited progress lines on stderr."""

    def __init__(self, enabled: bool, every_s: float = 5.0) -> None:
        self.enabled, self.every_s, self.last = enabled, every_s, 0.0

    def __call__(self, msg: str, *, force: bool = True) -> None:
        now = time.time()
        if self.enabled and (force or now - self.last >= self.every_s):
            self.last = now
            print(f"[sidecars] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------------------


def _plan(recap_files: list[str], join_on: str, columns: list[str], num_buckets: int | None, batch_rows: int) -> dict:
    """Read every recap file's footer: validate the schema, pick the column types and cut the files into units."""
    required = list(dict.fromkeys([join_on, *columns]))
    types: dict[str, pa.DataType] = {}
    files = []
    for url, (md, schema) in zip(recap_files, _ordered_map(_read_footer, recap_files), strict=True):
        for col in required:
            if col not in schema.names:
                raise ValueError(
                    f"recap file {url} is missing required column {col!r} (join_on={join_on!r}, "
                    f"columns={columns}); it has {schema.names}"
                )
        for col in columns:
            types.setdefault(col, _internal_type(schema.field(col).type))
        files.append([md.row_group(i).num_rows for i in range(md.num_row_groups)])
    recap_rows = sum(sum(rg) for rg in files)
    if num_buckets is None:
        num_buckets = max(1, math.ceil(recap_rows / TARGET_BUCKET_ROWS))
    unit_rows = max(batch_rows, math.ceil(recap_rows / num_buckets))
    # unit = list of [file_index, first_row_group, end_row_group, ordinal_of_first_row]
    units: list[list[list[int]]] = []
    cur: list[list[int]] = []
    cur_rows = 0
    ordinal = 0
    for fi, rgs in enumerate(files):
        for ri, n in enumerate(rgs):
            if cur and cur[-1][0] == fi and cur[-1][2] == ri:
                cur[-1][2] = ri + 1
            else:
                cur.append([fi, ri, ri + 1, ordinal])
            ordinal += n
            cur_rows += n
            if cur_rows >= unit_rows:
                units.append(cur)
                cur, cur_rows = [], 0
    if cur:
        units.append(cur)
    return {
        "num_buckets": num_buckets,
        "unit_rows": unit_rows,
        "recap_rows": recap_rows,
        "types": pa.schema(list(types.items())).serialize().to_pybytes().hex(),
        "units": units,
    }


def _read_footer(url: str) -> tuple[pq.FileMetaData, pa.Schema]:
    try:
        with _open_input(url) as f, pq.ParquetFile(f) as pf:
            return pf.metadata, pf.schema_arrow
    except pa.ArrowException as e:  # truncated download, not a parquet file
        raise ValueError(f"recap file {url} is not a readable parquet file: {e}") from e


def _internal_type(t: pa.DataType) -> pa.DataType:
    """Type used in the scratch partitions: strings become large_string (no 2 GiB offset limit per batch)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.large_string()
    return t


def _recap_schema(plan: dict, columns: list[str]) -> pa.Schema:
    """Schema of the pass-1 partitions: normalised join value, caption columns, input ordinal."""
    types = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(plan["types"])))
    return pa.schema([(_J, pa.large_string()), *[(c, types.field(c).type) for c in columns], (_ORD, pa.int64())])


def _index_schema() -> pa.Schema:
    return pa.schema([(_J, pa.large_string()), (_SHARD, pa.int32()), (_KEY, pa.large_string())])


def _joined_schema(recap_schema: pa.Schema) -> pa.Schema:
    payload = [f for f in recap_schema if f.name not in (_J, _ORD)]
    return pa.schema([(_SHARD, pa.int32()), (_KEY, pa.large_string()), (_ORD, pa.int64()), *payload])


# ----------------------------------------------------------------------------------------------------------------------
# Pass 1: recap -> bucketed units
# ----------------------------------------------------------------------------------------------------------------------


def _pass1_recap(ctx: _Ctx) -> None:
    units = ctx.plan["units"]
    nb = ctx.plan["num_buckets"]
    schema = _recap_schema(ctx.plan, ctx.columns)
    types = {c: schema.field(c).type for c in ctx.columns}
    read_cols = list(dict.fromkeys([ctx.join_on, *ctx.columns]))
    (ctx.work / "recap").mkdir(parents=True, exist_ok=True)
    t0, rows_done = time.time(), 0
    for u in range(ctx.manifest["progress"]["recap_units_done"], len(units)):
        parts: list[pa.Table] = []
        buckets: list[np.ndarray] = []
        stats = {"recap_rows": 0, "recap_null_join": 0}
        for fi, rg0, rg1, ord0 in units[u]:  # whole row groups, so ordinals are exact
            url = ctx.recap_files[fi]
            with _open_input(url) as f, pq.ParquetFile(f) as pf:
                offset = ord0
                for batch in pf.iter_batches(batch_size=ctx.batch_rows, row_groups=range(rg0, rg1), columns=read_cols):
                    n = batch.num_rows
                    j = _normalize_join(batch.column(ctx.join_on), ctx.join_on)
                    arrays = [j]
                    for c in ctx.columns:
                        try:
                            arrays.append(batch.column(c).cast(types[c]))
                        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                            raise ValueError(f"recap file {url}: cannot cast column {c!r} to {types[c]}: {e}") from e
                    arrays.append(pa.array(np.arange(offset, offset + n, dtype=np.int64)))
                    offset += n
                    table = pa.Table.from_arrays(arrays, schema=schema)
                    valid = _valid_mask(j)
                    table = table.filter(valid)
                    stats["recap_rows"] += n
                    stats["recap_null_join"] += n - table.num_rows
                    parts.append(table)
                    buckets.append(_buckets(table.column(_J), nb))
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        ctx.observe("pass1_unit", table.num_rows)
        _write_partitioned(ctx.work / "recap" / f"u{u:06d}.arrow", table, _concat(buckets), nb)
        ctx.manifest["progress"]["recap_units_done"] = u + 1
        ctx.save(stats)
        rows_done += stats["recap_rows"]
        ctx.say(
            f"pass 1/4 recap partition: unit {u + 1}/{len(units)}, {_rate(rows_done, t0)}", force=u + 1 == len(units)
        )


def _normalize_join(arr: pa.Array | pa.ChunkedArray, join_on: str) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.large_string())
    if join_on == "sha256":
        arr = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
    return arr


def _valid_mask(j: pa.Array) -> pa.Array:
    return pc.fill_null(pc.greater(pc.binary_length(j), 0), False)


def _buckets(j: pa.Array | pa.ChunkedArray, num_buckets: int) -> np.ndarray:
    """Vector form of :func:`bucket_of`."""
    n = len(j)
    if num_buckets == 1 or n == 0:
        return np.zeros(n, dtype=np.int64)
    values = j.cast(pa.large_binary()).to_pylist()
    crc = np.fromiter(map(zlib.crc32, values), dtype=np.uint64, count=n)
    return (crc % np.uint64(num_buckets)).astype(np.int64)


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# Pass 2: shard index -> bucketed units
# ----------------------------------------------------------------------------------------------------------------------


def _pass2_index(ctx: _Ctx) -> None:
    prog = ctx.manifest["progress"]
    nb = ctx.plan["num_buckets"]
    unit_rows = ctx.plan["unit_rows"]
    n_shards = len(ctx.shard_urls)
    schema = _index_schema()
    (ctx.work / "index").mkdir(parents=True, exist_ok=True)
    t0, samples_done = time.time(), 0
    start = prog["index_units"][-1][1] if prog["index_units"] else 0
    # shard indices are fetched ahead by a few threads (remote parquet/tar reads are latency bound), in order
    indices = _ordered_map(partial(_shard_index, join_on=ctx.join_on), ctx.shard_urls[start:])
    while start < n_shards:
        u = len(prog["index_units"])
        parts: list[pa.Table] = []
        buckets: list[np.ndarray] = []
        rows_per_shard: list[int] = []
        stats = dict.fromkeys(("shard_samples", "shard_null_join", "shards_from_parquet", "shards_from_tar_scan"), 0)
        rows, end = 0, start
        while end < n_shards and (rows < unit_rows or end == start):
            index, source = next(indices)
            stats[f"shards_from_{source}"] += 1
            n = index.num_rows
            j = _normalize_join(index.column(0), ctx.join_on)
            table = pa.Table.from_arrays(
                [j, pa.array(np.full(n, end, dtype=np.int32)), index.column(1).cast(pa.large_string())],
                schema=schema,
            ).filter(_valid_mask(j))
            stats["shard_samples"] += n
            stats["shard_null_join"] += n - table.num_rows
            parts.append(table)
            buckets.append(_buckets(table.column(_J), nb))
            rows_per_shard.append(table.num_rows)
            rows += table.num_rows
            end += 1
        table = pa.concat_tables(parts)
        ctx.observe("pass2_unit", table.num_rows)
        _write_json(ctx.work / "index" / f"u{u:06d}.json", {"start": start, "end": end, "rows": rows_per_shard})
        _write_partitioned(ctx.work / "index" / f"u{u:06d}.arrow", table, _concat(buckets), nb)
        prog["index_units"].append([start, end])
        ctx.save(stats)
        samples_done += stats["shard_samples"]
        ctx.say(f"pass 2/4 shard index: {end}/{n_shards} shards, {_rate(samples_done, t0)}", force=end == n_shards)
        start = end
    if prog["group_starts"] is None:
        rows_per_shard = []
        for u in range(len(prog["index_units"])):
            rows_per_shard += _read_json(ctx.work / "index" / f"u{u:06d}.json")["rows"]
        target = max(1, math.ceil(sum(rows_per_shard) / nb))
        starts, acc = [0], 0
        for s, n in enumerate(rows_per_shard):
            if acc >= target:
                starts.append(s)
                acc = 0
            acc += n
        prog["group_starts"] = starts
        ctx.save()


def _shard_index(url: str, join_on: str) -> tuple[pa.Table, str]:
    """Samples of one shard as a table (join value, key), from the img2dataset parquet or by scanning the tar.

    Returns:
        The table (columns ``join``, ``key``) and the source used: ``"parquet"`` or ``"tar_scan"``.
    """
    meta = _index_parquet_location(url)
    if meta is not None and _exists(meta):
        try:
            return _parquet_index(url, meta, join_on)
        except pa.ArrowException as e:  # a damaged img2dataset parquet: the tar itself has the keys
            log.warning("img2dataset index %s (for shard %s) is unreadable (%s); scanning the tar", meta, url, e)
    keys, values = _scan_tar(url, join_on)
    return pa.table({"join": pa.array(values, pa.string()), "key": pa.array(keys, pa.string())}), "tar_scan"


def _parquet_index(url: str, meta: str, join_on: str) -> tuple[pa.Table, str]:
    """The shard's samples from its img2dataset parquet (successful rows only)."""
    with _open_input(meta) as f, pq.ParquetFile(f) as pf:
        names = pf.schema_arrow.names
        for col in ("key", join_on):
            if col not in names:
                raise ValueError(
                    f"img2dataset index {meta} (for shard {url}) has no column {col!r}; it has {names}"
                    + (" (run img2dataset with compute_hash='sha256' or use join_on='key')" if col == "sha256" else "")
                )
        cols = list(dict.fromkeys(["key", join_on, *(["status"] if "status" in names else [])]))
        t = pf.read(columns=cols)
    if "status" in cols:
        t = t.filter(pc.fill_null(pc.equal(t.column("status").cast(pa.string()), "success"), False))
    key = t.column("key").cast(pa.string())
    return pa.table({"join": t.column(join_on).cast(pa.string()), "key": key}), "parquet"


def _scan_tar(url: str, join_on: str) -> tuple[list[str], list[str | None]]:
    """Stream a webdataset tar and return its sample keys and their join values (from ``KEY.json``).

    A truncated or corrupt tar raises a ``ValueError`` naming the shard: its sidecar would silently miss the samples
    after the damage, so the build stops until the shard is repaired or left out of ``shards``.
    """
    try:
        return _scan_tar_members(url, join_on)
    except tarfile.TarError as e:
        raise ValueError(f"shard {url} is damaged ({type(e).__name__}: {e}); repair it or leave it out") from e


def _scan_tar_members(url: str, join_on: str) -> tuple[list[str], list[str | None]]:
    index: dict[str, int] = {}
    keys: list[str] = []
    values: list[str | None] = []
    with _open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            m = _WDS_KEY.match(member.name)
            if m is None:
                continue
            key, ext = m.group(1), m.group(2)
            i = index.get(key)
            if i is None:
                i = index[key] = len(keys)
                keys.append(key)
                values.append(key if join_on == "key" else None)
            if join_on != "key" and ext.lower() == "json":
                fobj = tf.extractfile(member)
                try:
                    meta = json.loads(fobj.read()) if fobj is not None else {}
                except ValueError:
                    log.warning("%s: unreadable %s", url, member.name)
                    meta = {}
                v = meta.get(join_on) if isinstance(meta, dict) else None
                values[i] = None if v is None else str(v)
    return keys, values


# ----------------------------------------------------------------------------------------------------------------------
# Pass 3: per-bucket join -> joined partitions by shard group
# ----------------------------------------------------------------------------------------------------------------------


def _pass3_join(ctx: _Ctx) -> None:
    prog = ctx.manifest["progress"]
    nb = ctx.plan["num_buckets"]
    starts = np.asarray(prog["group_starts"], dtype=np.int64)
    recap_units = [ctx.work / "recap" / f"u{u:06d}.arrow" for u in range(len(ctx.plan["units"]))]
    index_units = [ctx.work / "index" / f"u{u:06d}.arrow" for u in range(len(prog["index_units"]))]
    recap_schema = _recap_schema(ctx.plan, ctx.columns)
    (ctx.work / "joined").mkdir(parents=True, exist_ok=True)
    t0, rows_done = time.time(), 0
    for b in range(prog["buckets_done"], nb):
        recap = pa.Table.from_batches([_read_part(p, b) for p in recap_units], schema=recap_schema)
        index = pa.Table.from_batches([_read_part(p, b) for p in index_units], schema=_index_schema())
        ctx.observe("pass3_bucket", recap.num_rows + index.num_rows)
        joined, stats = _join_bucket(recap, index)
        del recap, index
        ctx.observe("pass3_joined", joined.num_rows)
        group = np.searchsorted(starts, joined.column(_SHARD).to_numpy(), side="right") - 1
        _write_partitioned(ctx.work / "joined" / f"b{b:05d}.arrow", joined, group, len(starts))
        prog["buckets_done"] = b + 1
        ctx.save(stats)
        rows_done += joined.num_rows
        ctx.say(f"pass 3/4 join: bucket {b + 1}/{nb}, {_rate(rows_done, t0, 'matches')}", force=b + 1 == nb)


def _join_bucket(recap: pa.Table, index: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """Join one bucket: each shard sample gets the recap row with its join value that comes first in input order.

    Implemented as a hash lookup (``pc.index_in``, which returns the *first* match in the value set) on the recap
    rows sorted by input ordinal, followed by a ``take`` of the matched payload only.

    Args:
        recap: Recap rows of the bucket (``__j``, caption columns, ``__ord``).
        index: Shard samples of the bucket (``__j``, ``__shard``, ``__key``).

    Returns:
        The joined rows (``__shard``, ``__key``, ``__ord``, caption columns) and counters for the manifest.
    """
    n = recap.num_rows
    ords = recap.column(_ORD).to_numpy()
    if n > 1 and not bool(np.all(ords[1:] > ords[:-1])):  # pass 1 keeps input order; never hurts to make sure
        recap = recap.sort_by([(_ORD, "ascending")])
    j = recap.column(_J).combine_chunks()
    distinct = pc.count_distinct(j).as_py() if n else 0
    pos = pc.index_in(index.column(_J), value_set=j)
    hit = pc.is_valid(pos)
    pos = pos.filter(hit)
    matched = index.filter(hit)
    payload = recap.drop_columns([_J]).take(pos)
    joined = pa.table(
        [matched.column(_SHARD), matched.column(_KEY), *[payload.column(c) for c in payload.column_names]],
        names=[_SHARD, _KEY, *payload.column_names],
    )
    joined = joined.select([_SHARD, _KEY, _ORD, *[c for c in payload.column_names if c != _ORD]])
    matched_recap = pc.count_distinct(pos).as_py() if len(pos) else 0
    stats = {"recap_duplicates": n - distinct, "recap_rows_unmatched": distinct - matched_recap}
    return joined, stats


# ----------------------------------------------------------------------------------------------------------------------
# Pass 4: per shard group -> sidecars
# ----------------------------------------------------------------------------------------------------------------------


def _pass4_write(ctx: _Ctx) -> None:
    prog = ctx.manifest["progress"]
    nb = ctx.plan["num_buckets"]
    starts = prog["group_starts"]
    ends = [*starts[1:], len(ctx.shard_urls)]
    buckets = [ctx.work / "joined" / f"b{b:05d}.arrow" for b in range(nb)]
    meta = {"recap_suite.sidecar": json.dumps({"format": _FORMAT_VERSION, "join_on": ctx.join_on})}
    joined_schema = _joined_schema(_recap_schema(ctx.plan, ctx.columns))
    out_fields = [("key", pa.string())]
    for c in ctx.columns:
        t = joined_schema.field(c).type
        out_fields.append((c, pa.string() if pa.types.is_large_string(t) else t))
    out_schema = pa.schema(out_fields).with_metadata(meta)
    t0 = time.time()
    for g in range(prog["groups_done"], len(starts)):
        table = pa.Table.from_batches([_read_part(p, g) for p in buckets], schema=joined_schema)
        ctx.observe("pass4_group", table.num_rows)
        table = table.sort_by([(_SHARD, "ascending"), (_KEY, "ascending"), (_ORD, "ascending")])
        shard_col = table.column(_SHARD).to_numpy()
        stats = {"rows_matched": 0, "shard_duplicate_keys": 0}
        for s in range(starts[g], ends[g]):
            path = ctx.out / f"{ctx.stems[s]}.parquet"
            if path.exists():  # written by this build before a crash (the manifest config matched)
                stats["rows_matched"] += pq.read_metadata(path).num_rows
                continue
            lo, hi = np.searchsorted(shard_col, [s, s + 1])
            part = table.slice(lo, hi - lo)
            if part.num_rows > 1:
                k = part.column(_KEY).combine_chunks()
                keep = np.ones(part.num_rows, dtype=bool)
                keep[1:] = ~pc.equal(k.slice(1), k.slice(0, part.num_rows - 1)).to_numpy(zero_copy_only=False)
                stats["shard_duplicate_keys"] += int((~keep).sum())
                part = part.filter(pa.array(keep))
            sidecar = part.select([_KEY, *ctx.columns]).rename_columns(["key", *ctx.columns]).cast(out_schema)
            _write_sidecar(sidecar, path)
            ctx.written += 1
            stats["rows_matched"] += sidecar.num_rows
        prog["groups_done"] = g + 1
        ctx.save(stats)
        ctx.say(
            f"pass 4/4 write: {ends[g]}/{len(ctx.stems)} shards, {_rate(ends[g], t0, 'shards')}",
            force=g + 1 == len(starts),
        )


def _write_sidecar(table: pa.Table, path: Path) -> None:
    """Write one sidecar atomically (temporary file in the same directory, then ``os.replace``)."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


# ----------------------------------------------------------------------------------------------------------------------
# Partition files: Arrow IPC files with one record batch per partition (bucket or group)
# ----------------------------------------------------------------------------------------------------------------------


def _write_partitioned(path: Path, table: pa.Table, part: np.ndarray, num_parts: int) -> None:
    """Write ``table`` to an IPC file whose record batch ``p`` holds the rows with ``part == p`` (in input order)."""
    order = np.argsort(part, kind="stable")
    table = table.take(pa.array(order)).combine_chunks()
    offsets = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=num_parts))])

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=_IPC_OPTIONS) as writer:
            for p in range(num_parts):
                writer.write_batch(_as_batch(table.slice(int(offsets[p]), int(offsets[p + 1] - offsets[p]))))

    atomic_write(path, write)


def _as_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    return pa.RecordBatch.from_arrays([c.combine_chunks() for c in table.columns], schema=table.schema)


def _read_part(path: Path, p: int) -> pa.RecordBatch:
    """Read record batch ``p`` of a partition file (random access; only that batch is read)."""
    with pa.OSFile(str(path), "rb") as src:
        return pa.ipc.open_file(src).get_batch(p)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs, URLs and files
# ----------------------------------------------------------------------------------------------------------------------


def _expand_recap(recap: str | Path | Sequence[str | Path]) -> list[str]:
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


def _expand_shards(shards: str | Sequence[str]) -> list[str]:
    # the same shard specs as the DataModule's train_shards (dirs and globs too), each shard once
    return list(dict.fromkeys(expand_urls(shards)))


def _strip_query(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0] if "://" in url else url


def _shard_location(url: str) -> str:
    """The tar's own path/URL (the source inside a ``pipe:`` command)."""
    if not url.startswith("pipe:"):
        return url
    tokens = shlex.split(url[len("pipe:") :])
    for t in tokens:
        if _TAR_SUFFIX.search(_strip_query(t)):
            return t
    raise ValueError(f"cannot find a .tar path in the pipe URL {url!r}")


def _shard_stem(url: str) -> str:
    base = _strip_query(_shard_location(url)).rstrip("/").rsplit("/", 1)[-1]
    stem = _TAR_SUFFIX.sub("", base)
    if stem == base:
        stem = os.path.splitext(base)[0]
    if not stem:
        raise ValueError(f"cannot derive a shard name from {url!r}")
    return stem


def _index_parquet_location(url: str) -> str | None:
    """img2dataset writes ``<stem>.parquet`` beside ``<stem>.tar``; return its location, if one can be derived."""
    try:
        loc = _strip_query(_shard_location(url))
    except ValueError:
        return None
    if not _TAR_SUFFIX.search(loc):
        return None
    return _TAR_SUFFIX.sub(".parquet", loc)


def _is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _exists(url: str) -> bool:
    if _is_local(url):
        return os.path.exists(_local_path(url))
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return bool(fs.exists(path))
    except Exception as e:  # noqa: BLE001 - no filesystem driver / credentials: fall back to scanning the tar
        log.debug("cannot check %s (%s); scanning the tar instead", url, e)
        return False


@contextmanager
def _open_input(url: str) -> Iterator[IO[bytes] | str]:
    """A local path (parquet can memory-map it) or an open fsspec file."""
    if _is_local(url):
        path = _local_path(url)
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        yield path
        return
    with fsspec.open(url, "rb") as f:
        yield f


@contextmanager
def _open_stream(url: str) -> Iterator[IO[bytes]]:
    """Open a shard for streaming: local file, webdataset ``gopen`` (pipe:, http, gs, ...) or fsspec."""
    if _is_local(url):
        f = open(_local_path(url), "rb")  # noqa: SIM115 - closed below
    elif url.startswith("pipe:") or urlparse(url).scheme in _GOPEN_SCHEMES:
        from webdataset.gopen import gopen  # imported lazily: importing webdataset is slow

        f = gopen(url, "rb")
    else:
        f = fsspec.open(url, "rb").open()
    try:
        yield f
    finally:
        f.close()


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int = _IO_WORKERS) -> Iterator[Any]:
    """``map(fn, items)`` run by a thread pool with at most ``2 * workers`` results in flight, yielded in order."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sidecars-io")
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_stems(stems: list[str], urls: list[str]) -> None:
    seen: dict[str, str] = {}
    for stem, url in zip(stems, urls, strict=True):
        if stem in seen:
            raise ValueError(f"shards {seen[stem]!r} and {url!r} share the name {stem!r}; their sidecars would clash")
        seen[stem] = url


def _check_out_dir(out: Path, urls: list[str]) -> None:
    if "://" in os.fspath(out):
        raise ValueError(f"out_dir must be a local directory, got {out}")
    real = os.path.realpath(out)
    for url in urls:
        try:
            loc = _shard_location(url)
        except ValueError:
            continue
        if _is_local(loc) and os.path.realpath(os.path.dirname(os.path.abspath(_local_path(loc)))) == real:
            raise ValueError(
                f"out_dir {out} is the directory of shard {url}; sidecars would overwrite img2dataset's "
                "<stem>.parquet files there. Choose another out_dir."
            )


def _discard_build(out: Path, work: Path, stems: list[str]) -> None:
    """Remove a previous build: its manifest, scratch entries and sidecars (old and new shard names)."""
    old = _read_json(out / INPUTS_NAME) or {}
    for stem in {*stems, *old.get("stems", [])}:
        (out / f"{stem}.parquet").unlink(missing_ok=True)
    for name in (MANIFEST_NAME, INPUTS_NAME):
        (out / name).unlink(missing_ok=True)
    _clear_work(work)


def _clear_work(work: Path) -> None:
    """Delete what this module wrote under ``work`` (never anything else), then ``work`` itself if it is empty."""
    for name in _WORK_ENTRIES:
        path = work / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    with suppress(OSError):
        work.rmdir()


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def _sha1(items: list[str]) -> str:
    return hashlib.sha1("\n".join(items).encode("utf-8")).hexdigest()


def _rate(n: int, t0: float, what: str = "rows") -> str:
    dt = max(time.time() - t0, 1e-9)
    return f"{n:,} {what} ({n / dt:,.0f}/s)"


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m experiments sidecars --recap ... --shards ... --out ...``; prints the JSON summary.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Process exit code (0).
    """
    parser = argparse.ArgumentParser(
        prog="sidecars",
        description="Join a Recap-DataComp-1B style parquet table onto img2dataset shards: one sidecar per shard.",
    )
    parser.add_argument("--recap", nargs="+", required=True, help="recap parquet files, directories or globs")
    parser.add_argument("--shards", nargs="+", required=True, help="shard tars or brace patterns")
    parser.add_argument("--out", required=True, help="output directory for <stem>.parquet sidecars")
    parser.add_argument("--join-on", choices=JOIN_COLUMNS, default="key")
    parser.add_argument(
        "--columns", nargs="+", default=["re_caption"], help="recap columns to copy (space or comma separated)"
    )
    parser.add_argument("--num-buckets", type=int, default=None, help="default: ~1M recap rows per bucket")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default OUT/_work)")
    parser.add_argument("--batch-rows", type=int, default=65536)
    parser.add_argument("--overwrite", action="store_true", help="discard any previous build in OUT and rebuild")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch partitions")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    columns = [c for arg in args.columns for c in arg.split(",") if c]
    summary = build_sidecars(
        args.recap,
        args.shards,
        args.out,
        join_on=args.join_on,
        columns=columns,
        num_buckets=args.num_buckets,
        work_dir=args.work_dir,
        batch_rows=args.batch_rows,
        progress=not args.quiet,
        overwrite=args.overwrite,
        keep_work=args.keep_work,
    )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
