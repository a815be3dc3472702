"""``python -m experiments sidecars``: join a Recap-DataComp-1B style table onto img2dataset shards, one sidecar each.

The released recaptions (PAPER.md §7) are 1.24 B rows in ~3,550 parquet files, in no order of the image shards.
:func:`build_sidecars` writes ``OUT/<shard_stem>.parquet`` for every shard (``key`` and the requested columns, sorted
by key; possibly empty, so "no recaption" differs from "not built") in steps that ``OUT/_manifest.json`` records, so a
rerun resumes: (1) each shard's samples from the img2dataset ``<stem>.parquet`` beside its tar (``status ==
"success"``), else from the tar's ``.json`` members, to ``WORK/index/``; (2) the recap counts; (3) the join, sorted by
shard, streamed into one sidecar per shard (written atomically; those already written are kept).

Steps 2 and 3 run in DuckDB rather than polars: on a 2 M-row probe both joined in about the same time, but polars'
streaming engine peaked at 1.4 GiB, above the hand-written join it replaced, while DuckDB holds its ``memory_limit``
and spills to ``WORK/duckdb``. Join on ``key`` (our recaption job keeps the shard keys), ``sha256`` (the robust map
from the release to one's own download; lower-cased, whitespace stripped) or ``url`` (exact). The first recap row of
a join value wins (files in the order given, globs and directories sorted), the others count as
``recap_duplicates``; samples sharing a join value each get it; a key repeated in a shard is written once
(``shard_duplicate_keys``); null or empty join values are skipped and counted on both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from datamodules.formats import RECAP_SCHEMA, RECAP_V2_COLUMNS, RECAP_V2_SCHEMA
from datamodules.io import atomic_write
from datamodules.shards import expand_urls
from datamodules.sidecar import TAR_SUFFIX, _expand_recap, shard_location, sidecar_stem, strip_query

log = logging.getLogger(__name__)

RECAP_COLUMNS = tuple(RECAP_SCHEMA.names)  # of these, only join_on and the requested columns are required
JOIN_COLUMNS = ("key", "sha256", "url")
MANIFEST_NAME = "_manifest.json"
INPUTS_NAME = "_inputs.json"
UNIT_ROWS = 1_000_000  # shard-index rows per unit file: the resume granularity of step 1
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: KEY.ext -> (KEY, ext)
_GOPEN_SCHEMES = frozenset({"pipe", "http", "https", "sftp", "ftps", "scp", "gs", "htgs", "hf", "ais"})
_IO_WORKERS = 8  # threads reading shard indices and recap footers ahead (I/O latency, not CPU)
_WHITESPACE = " \t\n\r\x0b\x0c"  # stripped from sha256 values (the same in pyarrow and DuckDB)
_INDEX_STATS = ("shard_samples", "shard_null_join", "shards_from_parquet", "shards_from_tar_scan")


def build_sidecars(
    recap: str | Path | list[str | Path],
    shards: str | list[str],
    out_dir: str | Path,
    *,
    join_on: Literal["key", "sha256", "url"] = "key",
    columns: list[str] | tuple[str, ...] | None = None,
    num_buckets: int | None = None,
    work_dir: str | Path | None = None,
    batch_rows: int = 65536,
    progress: bool = True,
    overwrite: bool = False,
    keep_work: bool = False,
    memory_limit: str = "512MB",
    threads: int = 1,
) -> dict:
    """Write ``OUT/<shard_stem>.parquet`` for every shard (see the module docstring); return the build's counts
    and this call's (``shards_written``, ``shards_skipped``, ``elapsed_s``, ``resumed``, ``noop``).

    ``recap``: parquet files, directories or globs (local or fsspec URLs); ``shards``: as the DataModule takes them;
    ``columns``: default ``re_caption`` and the v2 columns (``formats.RECAP_V2_COLUMNS``) any recap file has; a v2
    column is null where its file lacks it (files of one run may mix), every sidecar of a build has the same schema;
    ``out_dir``: local, not the shards' directory; ``work_dir``: default ``OUT/_work``, of which only this job's
    entries are ever deleted; ``overwrite``: rebuild instead of resuming or refusing a previous build;
    ``memory_limit``, ``threads``: DuckDB's; its sort needs ~256 MB a thread, else it fails out of memory (20 M rows:
    1 thread and 512 MB peaked at 924 MiB, 2 and 768 MB at 1,133 MiB; the hand-written join took 1,139 MiB);
    ``num_buckets``, ``batch_rows``: ignored (the hand-written join's tuning).
    """
    t_start = time.time()
    say = partial(print, "[sidecars]", file=sys.stderr) if progress else lambda *_: None
    if num_buckets is not None or batch_rows != 65536:  # kept so old commands still run; say that they do nothing
        log.warning("sidecars: num_buckets / batch_rows are ignored (the hand-written join's; DuckDB sizes its own)")
    if join_on not in JOIN_COLUMNS:
        raise ValueError(f"join_on must be one of {JOIN_COLUMNS}, got {join_on!r}")
    recap_files = _expand_recap(recap)
    schemas, recap_rows = _read_footers(recap_files)
    if columns is None:
        columns = ["re_caption", *(c for c in RECAP_V2_COLUMNS if any(c in t.names for t in schemas))]
    columns = list(columns)
    if len(set(columns)) != len(columns):
        raise ValueError(f"duplicate names in columns={columns}")
    if "key" in columns or any(c.startswith("__") for c in columns):
        raise ValueError(f"columns={columns}: 'key' is always the shard sample key and cannot be requested")
    _check_recap(recap_files, schemas, join_on, columns)
    out, work = Path(out_dir), Path(work_dir) if work_dir is not None else Path(out_dir) / "_work"
    urls = list(dict.fromkeys(expand_urls(shards)))
    stems = [sidecar_stem(u) for u in urls]
    _check_inputs(out, urls, stems)
    config = {"format": 1, "join_on": join_on, "columns": columns, "recap_files": len(recap_files)}
    config.update(recap_sha1=_sha1(recap_files), shards=len(urls), shards_sha1=_sha1(urls))
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
        call = {"shards_written": 0, "shards_skipped": len(stems), "resumed": False, "noop": True}
        return {**manifest["summary"], **call, "elapsed_s": round(time.time() - t_start, 3)}
    resumed = manifest is not None and "counted" in manifest["progress"]  # the old join's manifests start afresh
    if resumed:
        say(f"resuming build in {out}: {json.dumps(manifest['progress'])[:200]}")
    else:
        stray = [s for s in stems if (out / f"{s}.parquet").exists()]
        if manifest is None and not overwrite and stray:
            raise ValueError(
                f"{out} already holds {len(stray)} sidecar-named files (e.g. {stray[0]}.parquet) but no "
                f"{MANIFEST_NAME}; use another out_dir or pass overwrite=True"
            )
        _discard_build(out, work, stems)
        say(f"planning: {len(recap_files)} recap files, {len(urls)} shards, join_on={join_on}")
        stats = {"recap_rows": recap_rows} | dict.fromkeys(_INDEX_STATS, 0)
        atomic_write(out / INPUTS_NAME, json.dumps({"recap_files": recap_files, "shards": urls, "stems": stems}))
        progress_ = {"index_units": [], "counted": False, "complete": False}
        manifest = {"config": config, "progress": progress_, "stats": stats, "summary": None}
        _save(out, manifest)
    (work / "index").mkdir(parents=True, exist_ok=True)
    _index(out, work, manifest, urls, join_on, progress)
    engine = {"memory_limit": memory_limit, "temp_directory": str(work / "duckdb"), "threads": threads}
    con = _connect(engine | {"preserve_insertion_order": False, "enable_progress_bar": progress}, recap_files)
    _views(con, work, recap_files, schemas, join_on, columns)
    if not manifest["progress"]["counted"]:
        stats = _count_recap(con)
        stats["recap_null_join"] = manifest["stats"]["recap_rows"] - stats.pop("recap_valid")
        manifest["stats"].update(stats)
        manifest["progress"]["counted"] = True
        _save(out, manifest)
    schema = _out_schema(schemas, join_on, columns)
    written, stats = _join_and_write(con, out, stems, schema, threads, progress)
    st = manifest["stats"] | stats
    summary = {"out_dir": str(out), "join_on": join_on, "columns": columns, "shards": len(stems), **st}
    summary.update(shard_samples_without_recap=st["shard_samples"] - st["rows_matched"], recap_files=len(recap_files))
    manifest.update(summary=summary, progress=manifest["progress"] | {"complete": True})
    _save(out, manifest)
    if not keep_work:
        _clear_work(work)
    call = {"shards_written": written, "shards_skipped": len(stems) - written, "resumed": resumed, "noop": False}
    summary |= call | {"elapsed_s": round(time.time() - t_start, 3)}
    counts = ("rows_matched", "shard_samples_without_recap", "recap_rows_unmatched", "recap_duplicates")
    say(f"done in {summary['elapsed_s']:.1f}s: " + ", ".join(f"{summary[k]:,} {k}" for k in counts))
    return summary


def _read_footers(files: list[str]) -> tuple[list[pa.Schema], int]:
    """Every recap file's schema (its footer: readable parquet) and the number of rows of all of them."""

    def footer(url: str) -> pq.FileMetaData:
        try:
            with fsspec.open(url, "rb") as f:
                return pq.read_metadata(f)
        except pa.ArrowException as e:  # truncated download, not a parquet file
            raise ValueError(f"recap file {url} is not a readable parquet file: {e}") from e

    with ThreadPoolExecutor(_IO_WORKERS) as pool:
        footers = list(pool.map(footer, files))
    return [md.schema.to_arrow_schema() for md in footers], sum(md.num_rows for md in footers)


def _check_recap(files: list[str], schemas: list[pa.Schema], join_on: str, columns: list[str]) -> None:
    """Every recap file has the join column and the requested columns, except the v2 ones (null where absent)."""
    for url, schema in zip(files, schemas, strict=True):
        for col in dict.fromkeys([join_on, *columns]):
            if col not in schema.names and col not in RECAP_V2_COLUMNS:
                raise ValueError(
                    f"recap file {url} is missing required column {col!r} (join_on={join_on!r}, "
                    f"columns={columns}); it has {schema.names}"
                )


def _index(out: Path, work: Path, manifest: dict, urls: list[str], join_on: str, progress: bool) -> None:
    """Step 1: every shard's samples as (normalised join value, shard number, key), ~``UNIT_ROWS`` rows per file."""
    units = manifest["progress"]["index_units"]
    first = units[-1][1] if units else 0
    parts, stats = [], dict.fromkeys(_INDEX_STATS, 0)
    bar = tqdm(total=len(urls), initial=first, desc="sidecars: index", unit="shard", disable=not progress)
    with ThreadPoolExecutor(_IO_WORKERS) as pool:
        for lo in range(first, len(urls), 2 * _IO_WORKERS):  # a few shards read ahead, in order
            batch = range(lo, min(lo + 2 * _IO_WORKERS, len(urls)))
            indices = pool.map(partial(_shard_index, join_on=join_on), batch, [urls[s] for s in batch])
            for s, (table, source, n) in zip(batch, indices, strict=True):
                parts.append(table)
                stats[f"shards_from_{source}"] += 1
                stats["shard_samples"] += n
                stats["shard_null_join"] += n - table.num_rows
                bar.update()
                if sum(p.num_rows for p in parts) >= UNIT_ROWS or s + 1 == len(urls):
                    unit = pa.concat_tables(parts)
                    atomic_write(work / f"index/u{len(units):06d}.parquet", partial(pq.write_table, unit))
                    units.append([units[-1][1] if units else 0, s + 1])
                    manifest["stats"] = {k: v + stats.get(k, 0) for k, v in manifest["stats"].items()}
                    _save(out, manifest)
                    parts, stats = [], dict.fromkeys(_INDEX_STATS, 0)
    bar.close()


def _shard_index(s: int, url: str, join_on: str) -> tuple[pa.Table, str, int]:
    """Shard ``s``'s samples as (normalised join value ``j``, ``shard``, ``key``) without null or empty join values,
    where they came from (its img2dataset parquet, else a scan of the tar) and how many samples it has."""
    join, key, source = _shard_samples(url, join_on)
    j = pc.utf8_lower(pc.utf8_trim(join, _WHITESPACE)) if join_on == "sha256" else join
    table = pa.table({"j": j, "shard": pa.array(np.full(len(j), s, dtype=np.int32)), "key": key})
    return table.filter(pc.greater(pc.utf8_length(j), 0)), source, len(j)


def _shard_samples(url: str, join_on: str) -> tuple[pa.Array, pa.Array, str]:
    loc = ""
    with suppress(ValueError):
        loc = strip_query(shard_location(url))
    meta = TAR_SUFFIX.sub(".parquet", loc) if TAR_SUFFIX.search(loc) else None
    if meta is not None and _exists(meta):
        try:
            with fsspec.open(meta, "rb") as f, pq.ParquetFile(f) as pf:
                names = pf.schema_arrow.names
                for col in ("key", join_on):
                    if col not in names:
                        hint = " (run img2dataset with compute_hash='sha256' or use join_on='key')" * (col == "sha256")
                        raise ValueError(
                            f"img2dataset index {meta} (for shard {url}) has no column {col!r}; it has {names}{hint}"
                        )
                t = pf.read(columns=list(dict.fromkeys(["key", join_on, *(["status"] if "status" in names else [])])))
            if "status" in t.column_names:
                t = t.filter(pc.fill_null(pc.equal(t.column("status").cast(pa.string()), "success"), False))
            return t[join_on].cast(pa.string()), t["key"].cast(pa.string()), "parquet"
        except pa.ArrowException as e:  # a damaged img2dataset parquet: the tar itself has the keys
            log.warning("img2dataset index %s (for shard %s) is unreadable (%s); scanning the tar", meta, url, e)
    try:
        keys, values = _scan_tar(url, join_on)
    except tarfile.TarError as e:  # its sidecar would silently miss the samples after the damage
        raise ValueError(f"shard {url} is damaged ({type(e).__name__}: {e}); repair it or leave it out") from e
    return pa.array(values, pa.string()), pa.array(keys, pa.string()), "tar_scan"


def _scan_tar(url: str, join_on: str) -> tuple[list[str], list[str | None]]:
    """The sample keys of a webdataset tar and their join values (from ``KEY.json``), streaming it once."""
    from webdataset.gopen import gopen  # imported lazily: importing webdataset is slow

    values: dict[str, str | None] = {}
    fsspec_only = "://" in url and urlparse(url).scheme not in _GOPEN_SCHEMES | {"file"}
    opened = fsspec.open(url, "rb") if fsspec_only else gopen(url, "rb")
    with opened as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
        for member in tf:
            m = _WDS_KEY.match(member.name) if member.isfile() else None
            if m is None:
                continue
            key, ext = m.groups()
            values.setdefault(key, key if join_on == "key" else None)
            if join_on != "key" and ext.lower() == "json":
                try:
                    meta = json.loads(tf.extractfile(member).read())
                except ValueError:
                    log.warning("%s: unreadable %s", url, member.name)
                    meta = {}
                v = meta.get(join_on) if isinstance(meta, dict) else None
                values[key] = None if v is None else str(v)
    return list(values), list(values.values())


def _connect(settings: dict, recap_files: list[str]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for name, value in settings.items():
        if value is not None:
            con.execute(f"SET {name} = '{value}'")
    for protocol in {f.split("://", 1)[0] for f in recap_files if "://" in f}:
        con.register_filesystem(fsspec.filesystem(protocol))  # DuckDB reads any fsspec URL through fsspec
    return con


def _views(con, work: Path, files: list[str], schemas: list[pa.Schema], join_on: str, columns: list[str]) -> None:
    """``recap`` (normalised join value ``j``, input place ``o``, the columns) and ``idx`` (the shard index). Files
    lacking a v2 column are read by name (null there); a v2 column no file has is a typed null."""
    j = f'CAST("{join_on}" AS VARCHAR)'
    if join_on == "sha256":  # trim only where an end is whitespace: trim() with a character set is slow
        j = f"lower(CASE WHEN {j}[1] > ' ' AND {j}[-1] > ' ' THEN {j} ELSE trim({j}, '{_WHITESPACE}') END)"
    # a row's place in the input (o) and a shard sample's identity (r): file index high, row in the file low
    o = "(file_index::BIGINT << 40) + file_row_number"
    nowhere = {c for c in columns if not any(c in t.names for t in schemas)}
    mixed = any(c not in t.names for c in set(columns) - nowhere for t in schemas)
    sql_type = {f.name: "BIGINT" if pa.types.is_integer(f.type) else "VARCHAR" for f in RECAP_V2_SCHEMA}
    cols = ", ".join(f'NULL::{sql_type[c]} AS "{c}"' if c in nowhere else f'"{c}"' for c in columns)
    for name, expr, paths, union in (
        ("recap", f"{j} AS j, {o} AS o, {cols}", files, mixed),
        ("idx", f"*, {o} AS r", [work / "index" / "*.parquet"], False),
    ):
        paths = ", ".join("'{}'".format(str(p).replace("'", "''")) for p in paths)
        options = "file_row_number = 1" + ", union_by_name = 1" * union
        con.execute(f"CREATE VIEW {name} AS SELECT {expr} FROM read_parquet([{paths}], {options})")


def _count_recap(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Step 2: recap rows with a valid join value, duplicates of an earlier row, join values matching no sample."""
    groups = "SELECT j, count(*) AS n FROM recap WHERE j <> '' GROUP BY j"
    unmatched = "count(*) FILTER (WHERE j NOT IN (SELECT j FROM idx))"
    query = f"SELECT coalesce(sum(n), 0), count(*), {unmatched} FROM ({groups})"
    valid, distinct, unmatched = con.execute(query).fetchall()[0]
    return {"recap_valid": valid, "recap_duplicates": valid - distinct, "recap_rows_unmatched": unmatched}


def _join_and_write(con, out: Path, stems: list[str], schema: pa.Schema, threads: int, progress: bool):
    """Step 3: every (shard sample, recap row) pair with the same join value, sorted by shard, key and input place,
    into one sidecar per shard, written by a few threads (parquet and fsync release the GIL). Returns how many were
    written (those of an interrupted run are kept) and the counts of sidecar rows and repeated keys."""
    cols = ", ".join(f'"{c}"' for c in schema.names[1:])
    query = f"SELECT i.shard, i.key, i.r, {cols} FROM recap r JOIN idx i USING (j) ORDER BY i.shard, i.key, r.o"
    pairs = con.sql(query)  # held: a reader whose relation is gone fetches the whole result at once
    shards = _by_shard(pairs.to_arrow_reader(65536), len(stems))
    workers = max(2, threads)
    written, stats, pending = 0, {"rows_matched": 0, "shard_duplicate_keys": 0}, deque()
    with ThreadPoolExecutor(workers) as pool:
        for s, part in tqdm(shards, total=len(stems), desc="sidecars: write", unit="shard", disable=not progress):
            keys = part.column("key").to_numpy(zero_copy_only=False)
            first = np.concatenate([[True], keys[1:] != keys[:-1]])[: len(keys)]  # a key's first recap row wins
            table = part.filter(first).select(schema.names).cast(schema)
            stats["rows_matched"] += table.num_rows
            stats["shard_duplicate_keys"] += pc.count_distinct(part.column("r")).as_py() - table.num_rows
            if not (out / f"{stems[s]}.parquet").exists():
                pending.append(pool.submit(_write_sidecar, table, out / f"{stems[s]}.parquet"))
                written += 1
            while pending and (pending[0].done() or len(pending) > 4 * workers):
                pending.popleft().result()
        for future in pending:
            future.result()
    con.close()
    return written, stats


def _by_shard(reader: pa.RecordBatchReader, n_shards: int):
    """``(shard, table)`` for every shard in order (empty where it has no rows), from batches sorted by shard."""
    s, parts = 0, []
    for batch in reader:
        values, starts = np.unique(batch.column("shard").to_numpy(), return_index=True)
        for v, lo, hi in zip(values, starts, [*starts[1:], batch.num_rows], strict=True):
            while s < v:
                yield s, pa.Table.from_batches(parts, reader.schema)
                s, parts = s + 1, []
            parts.append(batch.slice(lo, hi - lo))
    while s < n_shards:
        yield s, pa.Table.from_batches(parts, reader.schema)
        s, parts = s + 1, []


def _out_schema(schemas: list[pa.Schema], join_on: str, columns: list[str]) -> pa.Schema:
    """The sidecar's columns, typed as in the first recap file that has them (strings as ``string``), else as in
    ``formats.RECAP_V2_SCHEMA``: the same schema for every shard of a build."""
    fields = [pa.field("key", pa.string())]
    for c in columns:
        t = next((t.field(c).type for t in schemas if c in t.names), None) or RECAP_V2_SCHEMA.field(c).type
        t = t.value_type if pa.types.is_dictionary(t) else t
        fields.append(pa.field(c, pa.string() if pa.types.is_large_string(t) or pa.types.is_string_view(t) else t))
    return pa.schema(fields, metadata={"recap_suite.sidecar": json.dumps({"format": 1, "join_on": join_on})})


def _write_sidecar(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _exists(url: str) -> bool:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return bool(fs.exists(path))
    except Exception as e:  # noqa: BLE001 - no filesystem driver / credentials: fall back to scanning the tar
        log.debug("cannot check %s (%s); scanning the tar instead", url, e)
        return False


def _check_inputs(out: Path, urls: list[str], stems: list[str]) -> None:
    seen: dict[str, str] = {}
    for stem, url in zip(stems, urls, strict=True):
        if stem in seen:
            raise ValueError(f"shards {seen[stem]!r} and {url!r} share the name {stem!r}; their sidecars would clash")
        seen[stem] = url
    if "://" in os.fspath(out):
        raise ValueError(f"out_dir must be a local directory, got {out}")
    for url in urls:
        try:
            loc = shard_location(url).removeprefix("file://")
        except ValueError:
            continue
        if "://" not in loc and os.path.realpath(os.path.dirname(os.path.abspath(loc))) == os.path.realpath(out):
            raise ValueError(
                f"out_dir {out} is the directory of shard {url}; sidecars would overwrite img2dataset's "
                "<stem>.parquet files there. Choose another out_dir."
            )


def _discard_build(out: Path, work: Path, stems: list[str]) -> None:
    """Remove a previous build: its manifest, scratch entries and sidecars (old and new shard names)."""
    old = _read_json(out / INPUTS_NAME) or {}
    for path in [out / f"{stem}.parquet" for stem in {*stems, *old.get("stems", [])}] + [
        out / MANIFEST_NAME,
        out / INPUTS_NAME,
    ]:
        path.unlink(missing_ok=True)
    _clear_work(work)


def _clear_work(work: Path) -> None:
    """Delete what this job wrote under ``work`` (never anything else), then ``work`` itself if it is empty."""
    for name in ("index", "duckdb"):
        shutil.rmtree(work / name, ignore_errors=True)
    with suppress(OSError):
        work.rmdir()


def _sha1(items: list[str]) -> str:
    return hashlib.sha1("\n".join(items).encode("utf-8")).hexdigest()


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _save(out: Path, manifest: dict) -> None:
    atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=1))


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments sidecars --recap ... --shards ... --out ...``; prints the JSON summary."""
    parser = argparse.ArgumentParser(prog="sidecars", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--recap", nargs="+", required=True, help="recap parquet files, directories or globs")
    add("--shards", nargs="+", required=True, help="shard tars or brace patterns")
    add("--out", dest="out_dir", required=True, help="output directory for <stem>.parquet sidecars")
    add("--join-on", choices=JOIN_COLUMNS, default="key")
    why = "recap columns to copy (space or comma separated); default re_caption and the v2 columns the files have"
    add("--columns", nargs="+", default=None, help=why)
    add("--num-buckets", type=int, default=None, help="ignored (the old join's; DuckDB partitions its own join)")
    add("--batch-rows", type=int, default=65536, help="ignored (the old join's; DuckDB sizes its own batches)")
    add("--work-dir", default=None, help="scratch directory (default OUT/_work)")
    add("--memory-limit", default="512MB", help="DuckDB's memory limit (it spills to the work dir beyond it)")
    add("--threads", type=int, default=1, help="DuckDB threads (each needs ~256 MB of the memory limit)")
    add("--overwrite", action="store_true", help="discard any previous build in OUT and rebuild")
    add("--keep-work", action="store_true", help="keep the scratch files")
    add("--quiet", dest="progress", action="store_false", help="no progress output")
    args = parser.parse_args(argv)
    if args.columns is not None:
        args.columns = [c for arg in args.columns for c in arg.split(",") if c]
    print(json.dumps(build_sidecars(**vars(args)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
