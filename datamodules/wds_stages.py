"""The caption-mix loader's webdataset pipeline stages (``CaptionMixStream._batches`` lists them).

A stage maps an iterator of samples to an iterator (open_clip's style). Stages never raise on one bad sample: they
count a reason in a :class:`SkipStats`, whose counts (and records) travel to the main process inside each batch
(``batch["skipped"]``). The caption source of a sample is a pure function of ``(seed, epoch, key)``
(:func:`uniform_from_key`): the same under any worker count, rank count, shuffle buffer or restart.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import io
import itertools
import json
import math
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


# ----------------------------------------------------------------------------------------------------------- hashing
def uniform_from_key(seed: int, epoch: int, key: str, salt: str = "caption") -> float:
    """A uniform number in [0, 1) that depends only on ``(seed, epoch, key, salt)``.

    blake2b rather than Python's ``hash`` (salted per process) or a stateful RNG (depends on sample order).
    """
    digest = hashlib.blake2b(f"{salt}/{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def stable_int(*parts: object) -> int:
    """A 63-bit integer seed derived from ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ------------------------------------------------------------------------------------------------------------- stats
SKIPS_ONLY = "_skips_only"
"""Key of the item a stream yields after its last batch when skips were counted after it (no samples in it)."""

KEPT_PREFIXES = ("fallback:", "sidecar_", "caption_", "dedupe_")
"""Reasons that do not drop the sample (or shard): it is used with another caption source."""

UNRECORDED_PREFIXES = ("fallback:", "caption_")
"""Reasons counted but not recorded for the skip log: the sample was used (with another caption source). A sample
that had no usable caption at all is recorded as ``no_caption``."""


@dataclass
class SkipStats:
    """Per-worker counters of skipped samples and caption fallbacks, drained into each batch.

    ``record=True`` also keeps one record per dropped sample or shard-level event (``reason``, ``key``, ``shard``,
    ``detail``; not for :data:`UNRECORDED_PREFIXES`) until the next drain, for the skip log: at most ``max_records``
    between two drains; beyond that only the counts stay exact and the records left out are counted ``records_lost``.
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    extracted: int = 0  # samples that got past extraction; lets a cycling shard schedule detect "all unusable"
    max_consecutive_drops: int | None = 10_000
    consecutive_drops: int = 0
    record: bool = False
    max_records: int = 100_000
    records: list[dict[str, Any]] = field(default_factory=list)
    records_lost: int = 0

    def skip(self, reason: str, where: str = "", *, key=None, shard=None, detail=None) -> None:
        """Count one event; ``where`` is the human-readable example, ``key``/``shard``/``detail`` go to the record."""
        self.counts[reason] += 1
        self.examples.setdefault(reason, where)
        if self.record and not reason.startswith(UNRECORDED_PREFIXES):
            if len(self.records) < self.max_records:
                self.records.append({"key": key, "reason": reason, "shard": shard, "detail": detail})
            else:
                self.records_lost += 1
        if reason.startswith(KEPT_PREFIXES):
            return  # the sample (or shard) is still used
        self.consecutive_drops += 1
        if self.max_consecutive_drops is not None and self.consecutive_drops > self.max_consecutive_drops:
            raise RuntimeError(
                f"{self.consecutive_drops} samples in a row were unusable (last: {reason} at {where}); the data is "
                f"broken or misconfigured. Skip counts: {dict(self.counts)}"
            )

    def used(self) -> None:
        self.consecutive_drops = 0

    def pending(self) -> bool:
        return bool(self.counts) or self.records_lost > 0

    def drain(self) -> dict[str, Any]:
        """Return and reset the counts (and records) since the last call: summing over batches gives totals."""
        out: dict[str, Any] = {"counts": dict(self.counts), "examples": dict(self.examples)}
        self.counts.clear()
        self.examples.clear()
        if self.record:
            out["records"], self.records = self.records, []
            if self.records_lost:
                out["records_lost"], self.records_lost = self.records_lost, 0
        return out


def merge_skips(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Add the drained skips ``other`` to ``into`` (both as :meth:`SkipStats.drain` returns them); returns ``into``."""
    into["counts"] = dict(Counter(into.get("counts", {})) + Counter(other.get("counts", {})))
    examples = into.setdefault("examples", {})
    for reason, where in other.get("examples", {}).items():
        examples.setdefault(reason, where)
    if "records" in other or "records" in into:
        into["records"] = list(into.get("records", [])) + list(other.get("records", []))
    lost = into.get("records_lost", 0) + other.get("records_lost", 0)
    if lost:
        into["records_lost"] = lost
    return into


@dataclass
class CountingHandler:
    """webdataset exception handler: count the error (broken tar, unreadable shard) and continue."""

    stats: SkipStats

    def __call__(self, exn: Exception) -> bool:
        from webdataset.tariterators import base_plus_ext  # the key as ReadShards groups members

        detail = repr(exn)[:300]
        member = getattr(exn, "member", None)  # TarFormatError: the damaged member, when its header was readable
        key = base_plus_ext(member)[0] if isinstance(member, str) and member else None
        shard = getattr(exn, "shard", None)
        self.stats.skip(f"tar_error:{type(exn).__name__}", detail, key=key, shard=shard, detail=detail)
        return True


# ------------------------------------------------------------------------------------------------------------ shards
@dataclass
class ShardSchedule:
    """Which shards one (rank, worker) reads in one epoch. ``mode``:

    * ``"cycle"`` (training): the shard list shuffled by ``(seed, epoch)``, split into disjoint slices by global
      worker index, each worker cycling through its slice (reshuffled per round) until the caller stops it, so
      every rank produces exactly the same number of batches even when shard sizes differ;
    * ``"resample"``: shards drawn with replacement, seeded by ``(seed, epoch, rank, worker)``;
    * ``"once"`` (evaluation): disjoint slices in file order, one pass.
    """

    urls: Sequence[str]
    seed: int
    epoch: int
    rank: int
    world_size: int
    worker: int
    num_workers: int
    mode: str = "cycle"
    shuffle: bool = True
    stats: SkipStats | None = None

    def __iter__(self) -> Iterator[dict[str, str]]:
        total = self.world_size * self.num_workers
        gid = self.rank * self.num_workers + self.worker
        if self.mode == "resample":
            rng = random.Random(stable_int("resample", self.seed, self.epoch, self.rank, self.worker))
            while True:
                yield {"url": rng.choice(self.urls)}
        order = list(self.urls)
        if self.shuffle and self.mode == "cycle":
            random.Random(stable_int("shards", self.seed, self.epoch)).shuffle(order)
        mine = order[gid::total]
        if self.mode == "once":
            yield from ({"url": u} for u in mine)
            return
        last_extracted = None
        for round_ in itertools.count():
            if self.stats is not None and self.stats.extracted == last_extracted:
                raise RuntimeError(
                    f"a full pass over this worker's shards {mine[:3]}{'...' if len(mine) > 3 else ''} yielded no "
                    f"usable sample; skip counts so far: {dict(self.stats.counts)}"
                )
            last_extracted = self.stats.extracted if self.stats is not None else None
            if round_ > 0 and self.shuffle:
                random.Random(stable_int("round", self.seed, self.epoch, gid, round_)).shuffle(mine)
            yield from ({"url": u} for u in mine)


class TarFormatError(ValueError):
    """A tar stream that is truncated or corrupt (bad header checksum); ``member`` names the damaged member when its
    header was readable (else None)."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


_BLOCK = 512
_POSIX_MAGIC = b"ustar\x0000"


def _tar_number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 encoding of large sizes
        return int.from_bytes(field[1:], "big", signed=field[:1] == b"\xff")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        key, sep, value = kv.partition("=")
        if sep and key == "path":
            return value
    return None


def iter_tar_members(stream, where: str = "") -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for the regular files of a tar stream, in order.

    A lean streaming reader for webdataset shards (many small regular files): ustar/POSIX prefixes, GNU long names,
    pax ``path`` records, GNU base-256 sizes. Why not ``tarfile`` (webdataset's reader): it was ~30% of a worker's
    CPU on 64-px images, and in stream mode it ends a shard silently at a truncated or corrupt header after the
    first member. Here every header checksum is verified and anything truncated or corrupt, or an empty stream,
    raises :class:`TarFormatError` (counted, and the next shard is read).
    """
    read = stream.read
    long_name: str | None = None
    first = True
    while True:
        header = read(_BLOCK)
        if not header:
            if first:
                raise TarFormatError(f"empty tar stream in {where}")
            return  # a stream ending without the end-of-archive blocks is accepted, as tarfile does
        first = False
        if len(header) < _BLOCK:
            raise TarFormatError(f"truncated tar header in {where}")
        if header.count(0) == _BLOCK:
            return  # end-of-archive marker
        try:
            stored = _tar_number(header[148:156])
            size = _tar_number(header[124:136])
        except ValueError:
            stored = size = -1  # not octal: not a tar header
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise TarFormatError(f"bad tar header checksum in {where}")
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        data = read(padded)
        kind = header[156:157]
        if len(data) < padded:
            member = None if kind in (b"L", b"x", b"g") else (long_name or _member_name(header))
            raise TarFormatError(f"truncated tar member in {where}: {member}", member)
        data = data[:size]
        if kind in (b"L", b"x"):  # the name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace") if kind == b"L" else _pax_path(data)
            continue
        if kind == b"g":
            continue
        if kind not in (b"0", b"\0", b"7"):  # not a regular file (directory, link...)
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = _member_name(header)
        yield name, data


def webdataset_tar_members(stream, where: str = "") -> Iterator[tuple[str, bytes]]:
    """:func:`iter_tar_members` by webdataset's own tar reading (``tarfile`` in stream mode), for the benchmark."""
    import tarfile

    from webdataset.tariterators import tar_file_iterator

    try:
        for member in tar_file_iterator(stream, skip_meta=None):
            yield member["fname"], member["data"]
    except tarfile.ReadError as exn:
        raise TarFormatError(f"{exn} in {where}") from exn


def _member_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if header[257:265] == _POSIX_MAGIC and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
    return name


def open_shard(url: str):
    """Open a shard for streaming: webdataset's ``gopen`` for paths, ``pipe:`` and the schemes it knows (http, gs,
    hf...); fsspec for every other scheme (s3://, az://, memory://...), as open_clip users expect."""
    import webdataset as wds
    from webdataset.gopen import gopen_schemes

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme and scheme not in gopen_schemes:
        import fsspec

        return fsspec.open(url, "rb").open()
    stream = wds.gopen(url, bufsize=1 << 20)
    if url.startswith("pipe:"):
        # webdataset's Pipe.read polls the exit status after every read and raises, dropping the chunk it just read,
        # so a command failing after it wrote its data lost a timing-dependent tail; read plainly, and let close()
        # (which waits for the command and raises on a bad status; ReadShards counts it) report the failure.
        stream.read = stream.stream.read
    return stream


@dataclass
class ReadShards:
    """Shard URLs -> raw samples (``{"__key__", "__url__", "__visit__", <suffix>: bytes}``), shard by shard.

    URLs are opened with :func:`open_shard`. Members are grouped into samples by key as webdataset does (metadata
    members ``__*__`` skipped); a suffix seen twice within one key starts a new sample (then a duplicate key).
    ``__visit__`` numbers the shard visits, so a revisit of a shard is not a duplicate. A truncated or corrupt
    shard, or a ``pipe:`` command that exits with an error, goes to ``handler``; the samples before the damage are
    kept, the one being read is passed on with its intact members. ``tar_reader="webdataset"``: webdataset's tar
    reading (:func:`webdataset_tar_members`) instead of :func:`iter_tar_members`.
    """

    handler: Callable[[Exception], bool]
    tar_reader: str = "own"

    def _handled(self, exn: Exception, url: str) -> bool:
        """Name the shard on ``exn`` (its last arg, and ``exn.shard`` for the skip log); the handler's verdict."""
        exn.args = (*exn.args, url)
        with contextlib.suppress(AttributeError):  # a type with slots: the URL is still the last of its args
            exn.shard = url
        return self.handler(exn)

    def __call__(self, sources: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import base_plus_ext  # webdataset's own key/suffix split

        members = {"own": iter_tar_members, "webdataset": webdataset_tar_members}[self.tar_reader]
        for visit, source in enumerate(sources):
            url = source["url"]
            try:
                stream = open_shard(url)
            except Exception as exn:  # missing file, failed pipe: count and go on to the next shard
                if self._handled(exn, url):
                    continue
                return
            current: dict[str, Any] | None = None
            close_error: Exception | None = None
            try:
                for name, data in members(stream, url):
                    key, suffix = base_plus_ext(name)
                    if key is None or name.rsplit("/", 1)[-1].startswith("__"):
                        continue
                    suffix = suffix.lower()  # as webdataset's group_by_keys(lcase=True)
                    if current is None or key != current["__key__"] or suffix in current:
                        if current is not None:
                            yield current
                        current = {"__key__": key, "__url__": url, "__visit__": visit}
                    current[suffix] = data
                if current is not None:
                    yield current
                    current = None
            except Exception as exn:
                if current is not None:
                    yield current  # its members read so far are whole; a damaged member was never added
                if not self._handled(exn, url):
                    return
            finally:
                try:
                    stream.close()
                except Exception as exn:  # e.g. a pipe: command's non-zero exit status, reported at close
                    close_error = exn
            if close_error is not None and not self._handled(close_error, url):
                return


# ------------------------------------------------------------------------------------------ cross-shard duplicates
DEDUPE_MODES = ("worker", "global", "off")


class CrossShardDuplicates:
    """Which samples are copies of a key that belongs to another shard (README: "Duplicate keys"); a key repeated
    within one shard visit is dropped by :class:`ExtractCaptions`. ``"worker"``: this loader worker remembers for the
    epoch the shard each key was first read from (at most ``max_keys``, then counted once as ``dedupe_window_full``);
    a revisit of a shard (a cycling schedule) is no copy. ``"global"``: the index of :func:`build_duplicate_index`
    lists, per shard, the keys whose owner (the first shard of the list that holds them) is another shard.

    ``owner_if_copy`` returns the shard the key belongs to when this sample is a copy to drop, else None.
    """

    def __init__(self, mode: str = "worker", max_keys: int | None = 500_000, index_path: str | None = None):
        self.mode, self.max_keys, self.index_path = mode, max_keys, index_path
        self._first: dict[int, str] = {}  # worker mode: hash(key) -> the shard it was first read from
        self._full = False
        self._shards: list[str] = []  # global mode: the index's shard list
        self._drop: dict[str, dict[str, int]] | None = None  # global mode: shard -> {key: owner shard number}

    def owner_if_copy(self, key: str, url: str, stats: SkipStats | None = None) -> str | None:
        if self.mode == "global":
            if self._drop is None:
                index = read_duplicate_index(self.index_path)
                self._shards, self._drop = index["urls"], index["drop"]
            owner = self._drop.get(url, {}).get(key) if self._drop else None
            return None if owner is None else self._shards[owner]
        h = hash(key)  # 64-bit; a collision (~n^2 / 2^65 per worker epoch) would drop one sample
        first = self._first.get(h)
        if first is None:
            if self.max_keys is None or len(self._first) < self.max_keys:
                self._first[h] = url  # one str object per shard (ShardSchedule's), so a reference per key
            elif not self._full:
                self._full = True
                if stats is not None:
                    detail = f"{self.max_keys} keys remembered; later copies in this worker's epoch are not detected"
                    stats.skip("dedupe_window_full", f"{url}: {detail}", shard=url, detail=detail)
            return None
        return None if first == url else first


INDEX_FORMAT = 1


def _shard_signature(urls: Sequence[str]) -> str:
    """What a duplicate index depends on: the shard list in order and, for local files, their sizes and mtimes."""
    h = hashlib.sha256()
    for url in urls:
        h.update(url.encode() + b"\0")
        if "://" not in url and not url.startswith("pipe:"):
            try:
                st = os.stat(url)
                h.update(f"{st.st_size}/{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
        h.update(b"\n")
    return h.hexdigest()


def shard_keys(url: str) -> set[str]:
    """The keys a shard delivers (as :class:`ReadShards` groups them; a damaged shard: those before the damage)."""
    return {sample["__key__"] for sample in ReadShards(lambda exn: True)([{"url": url}])}


def build_duplicate_index(
    urls: Sequence[str], out: str, max_keys: int = 500_000, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Write the duplicate index of ``urls`` (JSON) to ``out`` and return its summary; see
    :class:`CrossShardDuplicates`.

    Every shard is read once (:func:`shard_keys`); its ``(key, shard)`` pairs go to a temporary SQLite table beside
    ``out``, in chunks of at most ``max_keys`` pairs, and SQLite (on disk) finds every pair whose key has an earlier
    shard. Memory: a chunk plus the entries (one per copy). The file: ``{"format", "signature", "urls", "keys" (pairs
    listed), "copies" (entries), "duplicated_keys", "drop": {url: {key: owner shard number}}}``.
    """
    import shutil
    import sqlite3
    import tempfile

    from datamodules.io import atomic_write

    urls, folder = list(urls), os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".dedupe-", dir=folder)
    drop: dict[str, dict[str, int]] = {}
    total = 0
    try:
        db = sqlite3.connect(os.path.join(tmp, "pairs.db"))
        db.execute("CREATE TABLE pairs (key TEXT, shard INTEGER)")
        for i, url in enumerate(urls):
            keys = sorted(shard_keys(url))
            total += len(keys)
            for start in range(0, len(keys), max_keys):
                db.executemany("INSERT INTO pairs VALUES (?, ?)", ((k, i) for k in keys[start : start + max_keys]))
            if log is not None and (i + 1) % 100 == 0:
                log(f"duplicate index: {i + 1}/{len(urls)} shards listed")
        owners = "SELECT key, shard, MIN(shard) OVER (PARTITION BY key) AS owner FROM pairs"
        for key, i, owner in db.execute(f"SELECT * FROM ({owners}) WHERE shard != owner ORDER BY shard, key"):
            drop.setdefault(urls[i], {})[key] = owner
        db.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    copies = sum(len(keys) for keys in drop.values())
    duplicated = len({key for keys in drop.values() for key in keys})
    summary = {"format": INDEX_FORMAT, "signature": _shard_signature(urls), "urls": urls, "keys": total}
    summary |= {"copies": copies, "duplicated_keys": duplicated}
    atomic_write(out, json.dumps({**summary, "drop": drop}))
    return summary


def read_duplicate_index(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not a duplicate index of format {INDEX_FORMAT}")
    return index


def ensure_duplicate_index(
    urls: Sequence[str], path: str, max_keys: int = 500_000, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """The summary of the duplicate index at ``path`` for ``urls``, (re)built when missing or made for other shards
    (another list or order, a local shard whose size or mtime changed)."""
    if os.path.isfile(path):
        try:
            index = read_duplicate_index(path)
        except (OSError, ValueError):
            index = None
        if index is not None and index.get("signature") == _shard_signature(urls) and index.get("urls") == list(urls):
            return {k: v for k, v in index.items() if k != "drop"}
    if log is not None:
        log(f"building the duplicate-key index of {len(urls)} shards at {path}")
    return build_duplicate_index(urls, path, max_keys, log)


# ----------------------------------------------------------------------------------------------- caption extraction
MAX_CAPTION_CHARS = 10_000
"""Longer captions are treated as missing (``caption_too_long``): web alt-text and recaptions are a few hundred
characters, and tokenizers read the whole string before truncating (open_clip's: ~0.8 s for 1 MB)."""


def _text(value: Any) -> tuple[str | None, str | None]:
    """A caption value -> ``(stripped text or None, problem or None)``; problems: ``not_utf8``, ``not_text``."""
    if value is None:
        return None, None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "not_utf8"
    elif not isinstance(value, str):
        return None, "not_text"
    value = value.strip()
    return value or None, None


@dataclass(frozen=True)
class SourceSpec:
    """Where one named caption source lives in a sample: ``"txt"`` (or any member extension such as
    ``"recap.txt"``), ``"json:FIELD"`` (a field of the ``.json`` member) or ``"sidecar:COLUMN"`` (a column of the
    per-shard sidecar parquet, joined by key)."""

    name: str
    kind: str
    where: str

    @classmethod
    def parse(cls, name: str, spec: str) -> SourceSpec:
        kind, sep, where = spec.partition(":")
        if not sep:
            return cls(name, "member", spec.lower())
        if kind not in ("json", "sidecar", "member") or not where:
            raise ValueError(
                f"caption source {name!r}: bad spec {spec!r}; "
                "use 'txt' (a tar member), 'json:FIELD' or 'sidecar:COLUMN'"
            )
        if kind == "sidecar":  # re_condition_length (an int) is no caption: a config error, not a per-sample fallback
            from datamodules.formats import check_caption_column

            check_caption_column(where, f"caption source {name!r} ({spec!r})")
        return cls(name, kind, where)


class ExtractCaptions:
    """Raw tar sample -> ``{key, url, image_bytes, captions: {source: str | None}}``; before the shuffle buffer, so a
    sidecar is loaded once per shard and the buffer holds encoded bytes.

    Skipped and counted: a key seen before in this shard visit or a copy of another shard's key (``duplicates``)
    (``duplicate_key``), no image member (``missing_image``). A caption that is not UTF-8, not a string, or longer
    than ``max_caption_chars`` counts as missing for its source (``caption_not_utf8``, ``caption_not_text``,
    ``caption_too_long``); an unparsable json member is ``bad_json``; a missing or unreadable sidecar is
    ``sidecar_missing`` / ``sidecar_unreadable`` (the shard is read without it); a sidecar without a requested
    column raises (it was built for other columns).
    """

    def __init__(
        self,
        sources: Sequence[SourceSpec],
        sidecar_dir: str | None,
        stats: SkipStats,
        max_caption_chars: int | None = MAX_CAPTION_CHARS,
        duplicates: CrossShardDuplicates | None = None,
    ):
        self.sources, self.sidecar_dir, self.stats = list(sources), sidecar_dir, stats
        self.max_caption_chars, self.duplicates = max_caption_chars, duplicates
        self.sidecar_columns = [s.where for s in self.sources if s.kind == "sidecar"]
        if self.sidecar_columns and not sidecar_dir:
            names = [s.name for s in self.sources if s.kind == "sidecar"]
            raise ValueError(f"caption sources {names} read a sidecar parquet, but no sidecar_dir was given")
        self._sidecar_url: str | None = None
        self._sidecar: Mapping[str, Mapping[str, str | None]] = {}
        self._visit: int | None = None
        self._seen: set[str] = set()

    def _load_sidecar(self, url: str) -> None:
        from datamodules.sidecar import UnreadableSidecarError, load_sidecar, sidecar_path

        self._sidecar_url, self._sidecar = url, {}
        path = sidecar_path(self.sidecar_dir, url)
        try:
            self._sidecar = load_sidecar(path, self.sidecar_columns)
        except FileNotFoundError:  # a whole shard without recaptions: count it once, fall back per sample
            self.stats.skip("sidecar_missing", path, shard=url, detail=path)
        except UnreadableSidecarError as exn:  # truncated/corrupt file: as a missing one (a missing column raises)
            self.stats.skip("sidecar_unreadable", str(exn)[:300], shard=url, detail=str(exn)[:300])

    def _caption(self, value: Any, source: str, key: str, url: str) -> str | None:
        text, problem = _text(value)
        if problem is None and text is not None and self.max_caption_chars and len(text) > self.max_caption_chars:
            text, problem = None, "too_long"
        if problem is not None:  # the source counts as missing for this sample (fallback / no_caption follow)
            self.stats.skip(f"caption_{problem}", f"{url}:{key} ({source})", key=key, shard=url, detail=source)
        return text

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            key, url = sample.get("__key__"), sample.get("__url__", "")
            if sample.get("__visit__") != self._visit:
                self._visit, self._seen = sample.get("__visit__"), set()
            if self.sidecar_columns and url != self._sidecar_url:
                self._load_sidecar(url)
            where = f"{url}:{key}"
            if key in self._seen:
                self.stats.skip("duplicate_key", where, key=key, shard=url, detail="twice in this shard")
                continue
            self._seen.add(key)
            if self.duplicates is not None:
                first = self.duplicates.owner_if_copy(key, url, self.stats)
                if first is not None:
                    detail = f"first read from {first}"
                    self.stats.skip("duplicate_key", f"{where} ({detail})", key=key, shard=url, detail=detail)
                    continue
            image = next((sample[m] for m in IMAGE_MEMBERS if m in sample), None)
            if image is None:
                self.stats.skip("missing_image", where, key=key, shard=url)
                continue
            meta: dict[str, Any] | None = None
            captions: dict[str, str | None] = {}
            for src in self.sources:
                if src.kind == "member":
                    value = sample.get(src.where)
                elif src.kind == "json":
                    if meta is None:
                        try:
                            meta = json.loads(sample.get("json") or b"{}")
                        except (ValueError, RecursionError):  # bad JSON or bad UTF-8; absurd nesting
                            self.stats.skip("bad_json", where, key=key, shard=url)
                            meta = {}
                    value = meta.get(src.where) if isinstance(meta, dict) else None
                else:
                    value = self._sidecar.get(key, {}).get(src.where)
                captions[src.name] = self._caption(value, src.name, key, url)
            self.stats.extracted += 1
            yield {"key": key, "url": url, "image_bytes": image, "captions": captions}


# --------------------------------------------------------------------------------------------------- caption choice
class ChooseCaption:
    """Pick one caption per sample: the paper's p made exact and reproducible.

    ``weights``: source name -> probability (``{original: p, recaption: 1 - p}`` for ``p_original`` = p). The draw
    ``uniform_from_key(seed, epoch, key)`` is mapped through the cumulative weights in source order: the same under
    any number of workers, ranks or restarts, another one each epoch ("each sample encounters different captions
    across epochs", paper §5.2). A drawn source that is missing falls back to the available source with the highest
    weight (``fallback:<from>-><to>``), or the sample is skipped (``fallback=False``). ``mode="concat"`` joins every
    available source in source order with ``separator`` (Table 3's "*concat").
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        seed: int,
        epoch: int,
        stats: SkipStats,
        mode: str = "sample",
        separator: str = " ",
        fallback: bool = True,
    ):
        self.names = list(weights)
        self.set_weights(weights)
        self.seed, self.epoch, self.stats = seed, epoch, stats
        self.mode, self.separator, self.fallback = mode, separator, fallback

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """New probabilities over the same sources (a p schedule's value at the next batch)."""
        self.weights = [float(weights[n]) for n in self.names]
        self._cumulative = list(itertools.accumulate(self.weights))
        self._fallback_order = [n for _, n in sorted(zip(self.weights, self.names, strict=True), key=lambda t: -t[0])]

    def choose(
        self, key: str, captions: Mapping[str, str | None], shard: str | None = None
    ) -> tuple[str | None, str | None]:
        """Return ``(caption, source_name)``; ``(None, None)`` when nothing usable exists. ``shard`` only labels a
        counted fallback."""
        if self.mode == "concat":
            parts = [captions[n] for n in self.names if captions.get(n)]
            return (self.separator.join(parts), "concat") if parts else (None, None)
        u = uniform_from_key(self.seed, self.epoch, key)
        i = min(bisect.bisect_right(self._cumulative, u), len(self.names) - 1)  # the first source with u < its sum
        if self.weights[i] == 0.0:  # the float tail (sums ending at 0.9999999): never a zero-weight source
            i = max(j for j, w in enumerate(self.weights) if w > 0)
        chosen = self.names[i]
        if captions.get(chosen):
            return captions[chosen], chosen
        if not self.fallback:
            return None, None
        for other in self._fallback_order + [n for n in captions if n not in self.names]:
            if other != chosen and captions.get(other):
                self.stats.skip(f"fallback:{chosen}->{other}", key, key=key, shard=shard)
                return captions[other], other
        return None, None

    def __call__(
        self, samples: Iterable[dict[str, Any]], p_at: Callable[[int], float] | None = None, kept: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Stage: each sample's ``caption`` and ``caption_source``; a sample without any is dropped (``no_caption``).

        ``p_at`` (a ``p_schedule`` run, after decode): p of the ``kept``-th kept sample of this stream (counted from
        ``kept``), drawn with ``{original: p, other: 1 - p}`` and stored as ``p_target``."""
        for sample in samples:
            key, url = sample["key"], sample["url"]
            if p_at is not None:
                p = sample["p_target"] = p_at(kept)
                self.set_weights({n: p if n == "original" else 1.0 - p for n in self.names})
            caption, source = self.choose(key, sample["captions"], url)
            if caption is None:
                self.stats.skip("no_caption", f"{url}:{key}", key=key, shard=url)
                continue
            kept += 1
            sample["caption"], sample["caption_source"] = caption, source
            yield sample


def keep_captioned(samples: Iterable[dict[str, Any]], stats: SkipStats) -> Iterator[dict[str, Any]]:
    """Stage before decode of a p-schedule run (whose draw waits for the decode): drops the samples without any
    caption (``no_caption``), as :class:`ChooseCaption` does in a run without a schedule."""
    for sample in samples:
        if any(sample["captions"].values()):
            yield sample
        else:
            key, url = sample["key"], sample["url"]
            stats.skip("no_caption", f"{url}:{key}", key=key, shard=url)


def choose_views(
    samples: Iterable[dict[str, Any]],
    views: Sequence[Any],
    order: Sequence[str],
    seed: int,
    epoch: int,
    stats: SkipStats,
    fallback: bool,
) -> Iterator[dict[str, Any]]:
    """Stage: every sample also carries the caption of each configured view (``sample["view_captions"]``), made
    partial where the view says so (``partial_captions.ViewSpec``; drawn from seed, epoch, key and view). A view
    whose source is missing falls back to the first available source of ``order`` (counted
    ``fallback:<view>:<from>-><to>``), or the sample is skipped (``no_view_caption``, ``fallback=False``)."""
    for sample in samples:
        key, url, captions, out = sample["key"], sample["url"], sample["captions"], {}
        for view in views:
            caption = captions.get(view.source)
            other = None if caption or not fallback else next((n for n in order if captions.get(n)), None)
            if other is not None:
                stats.skip(f"fallback:{view.name}:{view.source}->{other}", key, key=key, shard=url)
                caption = captions[other]
            if not caption:
                stats.skip("no_view_caption", f"{url}:{key} ({view.name})", key=key, shard=url, detail=view.name)
                break
            out[view.name] = view.text(caption, seed, epoch, key)
        else:
            sample["view_captions"] = out
            yield sample


# ------------------------------------------------------------------------------------------------------------ images
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own MAX_IMAGE_PIXELS (a 1/4 GiB RGBA image)
MIN_IMAGE_SIZE = 8
"""Images whose shorter side is below this are skipped (``tiny_image``): 1x1 tracking pixels and spacers carry no
content (img2dataset's ``min_image_size`` is the same filter, applied at download)."""


@dataclass(frozen=True)
class SampleLimits:
    """The loader's per-sample safety limits (``None`` turns one off; the DataModule's arguments say what each
    skips). A resumed run checks them, since they change which samples are kept."""

    min_image_size: int | None = MIN_IMAGE_SIZE
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    max_caption_chars: int | None = MAX_CAPTION_CHARS
    jpeg_draft: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def extract(self, sources, sidecar_dir: str | None, stats: SkipStats, duplicates=None) -> ExtractCaptions:
        return ExtractCaptions(sources, sidecar_dir, stats, self.max_caption_chars, duplicates)

    def decode(self, transform: Callable | None, stats: SkipStats) -> DecodeImage:
        return DecodeImage(transform, stats, self.max_image_pixels, self.min_image_size, self.jpeg_draft)


class ImageRejected(ValueError):
    """An image that decodes but is refused; ``reason`` is the skip reason (``oversized_image``, ``tiny_image``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> loaded 8-bit RGB. Unlike a bare ``convert("RGB")``: 16-bit greyscale is scaled to 8 bits,
    not clipped to white; transparency is composited on white (as img2dataset's alpha matting) instead of exposing
    what the transparent pixels store; an RGB image is only loaded, not copied."""
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N and 32-bit I
        arr = np.asarray(img)
        if img.mode != "I" or arr.max(initial=0) > 255:
            arr = (np.clip(arr, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def draft_request(transform: Callable | None) -> tuple[int, int] | None:
    """The smallest ``(width, height)`` a decoded image may be reduced to without changing what ``transform`` sees
    beyond resampling, or None when unknown (then images are decoded at full size).

    Known: a torchvision ``Compose`` whose first step is ``Resize`` (shorter side >= its size) or
    ``RandomResizedCrop``, as in every open_clip transform. Every crop the latter can draw must be at least its output
    size: a crop of area fraction ``a`` and aspect ``r`` spans ``sqrt(a * r)`` x ``sqrt(a / r)`` of the shorter side,
    so that side must be >= ``size / sqrt(scale_min * min(ratio_min, 1 / ratio_max))`` (1.22 x size for open_clip's
    ``scale=(0.9, 1.0)``). Looks through a ``functools.partial`` binding one such transform and ``__wrapped__``.
    """
    if isinstance(transform, functools.partial):
        found = {r for r in (draft_request(a) for a in transform.args) if r is not None}
        return found.pop() if len(found) == 1 else None
    if hasattr(transform, "__wrapped__"):
        return draft_request(transform.__wrapped__)
    steps = getattr(transform, "transforms", None)
    if not steps or not isinstance(steps, Sequence):
        return None
    first = steps[0]
    name = type(first).__name__
    if name not in ("Resize", "RandomResizedCrop") or not type(first).__module__.startswith("torchvision."):
        return None
    size = [first.size] if isinstance(first.size, int) else first.size
    if not isinstance(size, Sequence) or not size:
        return None
    h, w = size[0], size[-1]  # (size,) or (h, w)
    if name == "Resize":
        return int(w), int(h)
    scale_min, (ratio_min, ratio_max) = float(first.scale[0]), first.ratio
    worst = min(float(ratio_min), 1.0 / float(ratio_max), 1.0)
    if scale_min <= 0 or worst <= 0:
        return None
    side = math.ceil(max(h, w) * (1.0 / math.sqrt(scale_min * worst)))
    return side, side


def decode_image(
    fp: Any,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    min_image_size: int | None = MIN_IMAGE_SIZE,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Open and fully decode an image (bytes, path or file) as RGB (:func:`to_rgb`).

    Raises :class:`ImageRejected` for more than ``max_image_pixels`` (read from the header, before decoding; it
    replaces PIL's decompression-bomb warning, and PIL's own error at twice that refuses too) or a shorter side below
    ``min_image_size``; PIL's exceptions for undecodable data. ``draft``: decode a JPEG at the smallest DCT scale
    (1/2, 1/4, 1/8) that keeps both sides >= ``draft``.
    """
    if isinstance(fp, bytes | bytearray | memoryview):
        fp = io.BytesIO(fp)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if max_image_pixels else "error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if max_image_pixels and w * h > max_image_pixels:
                raise ImageRejected("oversized_image", f"{w}x{h} image is over max_image_pixels={max_image_pixels}")
            if min_image_size and min(w, h) < min_image_size:
                raise ImageRejected("tiny_image", f"{w}x{h} image is under min_image_size={min_image_size}")
            if draft is not None and img.format == "JPEG" and w >= 2 * draft[0] and h >= 2 * draft[1]:
                img.draft("RGB", draft)
            return to_rgb(img)  # also forces the full decode, so truncated files fail here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
        raise ImageRejected("oversized_image", str(exn)) from exn


class DecodeImage:
    """Decode the image bytes to RGB, apply the model's transform; count ``oversized_image``, ``tiny_image``,
    ``bad_image`` (undecodable) and ``transform_error`` (the transform raised).

    ``draft=True``: when the transform starts by resizing (:func:`draft_request`), decode a JPEG at the smallest DCT
    scale that still gives the resize at least its output size (CLIPA's 112 px stage decodes a 384 px image at
    192 px); ``False``: full size; a ``(width, height)`` tuple: that minimum.
    """

    def __init__(
        self,
        transform: Callable | None,
        stats: SkipStats,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        min_image_size: int | None = MIN_IMAGE_SIZE,
        draft: bool | tuple[int, int] = True,
    ):
        self.transform, self.stats = transform, stats
        self.max_image_pixels, self.min_image_size = max_image_pixels, min_image_size
        if draft is True:
            draft = draft_request(transform)
        self.draft = (int(draft[0]), int(draft[1])) if draft else None

    def _skip(self, reason: str, sample: dict[str, Any], detail: str) -> None:
        key, url = sample["key"], sample["url"]
        self.stats.skip(reason, f"{url}:{key}: {detail}"[:300], key=key, shard=url, detail=detail[:300])

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            try:
                img = decode_image(sample.pop("image_bytes"), self.max_image_pixels, self.min_image_size, self.draft)
            except ImageRejected as exn:
                self._skip(exn.reason, sample, str(exn))
                continue
            except Exception as exn:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
                self._skip("bad_image", sample, f"{type(exn).__name__}: {exn}")
                continue
            if self.transform is not None:
                try:
                    img = self.transform(img)
                except Exception as exn:  # one odd image must not stop a run; a transform that always fails
                    # still stops it, through max_consecutive_drops, with this reason and example
                    self._skip("transform_error", sample, f"{type(exn).__name__}: {exn}")
                    continue
            sample["image"] = img
            self.stats.used()
            yield sample


def transform_text(samples: Iterable[dict[str, Any]], transform: Callable) -> Iterator[dict[str, Any]]:
    """Stage: the model's text transform (e.g. a tokenizer) of the chosen caption (``text``) and of each view's
    (``texts``)."""
    for sample in samples:
        sample["text"] = transform(sample["caption"])
        if "view_captions" in sample:
            sample["texts"] = {v: transform(c) for v, c in sample["view_captions"].items()}
        yield sample


# ---------------------------------------------------------------------------------------------------------- batching
def _stack(values: list[Any]) -> Any:
    if values and isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
        return torch.stack(values)
    return values


def _collate(samples: list[dict[str, Any]], stats: SkipStats) -> dict[str, Any]:
    first = samples[0]
    batch: dict[str, Any] = {"image": _stack([s["image"] for s in samples])}
    batch |= {k: [s[k] for s in samples] for k in ("caption", "caption_source", "key", "url")}
    if "text" in first:
        batch["text"] = _stack([s["text"] for s in samples])
    if "view_captions" in first:
        batch["view_captions"] = {v: [s["view_captions"][v] for s in samples] for v in first["view_captions"]}
    if "texts" in first:
        batch["texts"] = {v: _stack([s["texts"][v] for s in samples]) for v in first["texts"]}
    if "p_target" in first:  # one p per batch: every sample of it was drawn at the batch's index
        batch["p_target"] = first["p_target"]
    batch["skipped"] = stats.drain()
    return batch


def batched(
    samples: Iterable[dict[str, Any]], batch_size: int, stats: SkipStats, last_partial: bool, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """Stage: batch dicts with the skips counted since the previous batch: ``image`` (stacked when the transform gives
    equal-shaped tensors), ``text`` (with a text transform), ``caption``, ``caption_source``, ``key``, ``url``
    (lists), ``skipped``. At most ``limit`` batches.

    ``last_partial=True`` (one evaluation pass): the last batch may be short, and skips counted after it are yielded
    as one more item, ``{"skipped": ..., SKIPS_ONLY: True}``, which the loader folds into its batches.
    """
    samples = iter(samples)
    for _ in itertools.count() if limit is None else range(limit):
        chunk = list(itertools.islice(samples, batch_size))
        if len(chunk) < batch_size:  # the stream ended
            if chunk and last_partial:
                yield _collate(chunk, stats)
            elif last_partial and stats.pending():
                yield {"skipped": stats.drain(), SKIPS_ONLY: True}
            return
        yield _collate(chunk, stats)
