"""``python -m experiments recaption``: recaption image shards with a llava-hf captioner, exactly once, resumably.

The unit of work is a shard (or a slice of one, ``--slice-size``); its captions go to ``<out>/<unit>.parquet`` in the
Recap-DataComp-1B schema plus provenance columns, published with ``link(2)``: complete or not at all, never twice.
Processes claim units on the output folder (``<out>/_claims``), so any number of them, started and killed in any way,
finish every unit exactly once. ``merge`` writes the dataset-level parquet (each key once) that ``python -m
experiments sidecars --recap`` joins onto the shards. The design, and the paper's decoding: ``docs/recaption.md``.

    python -m experiments recaption run --model runs/tiny/captioner/hf --shards 'data/world/web/*.tar' \
        --out data/world/recap_llava
    python -m experiments recaption merge --out data/world/recap_llava
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import functools
import glob
import hashlib
import inspect
import io
import itertools
import json
import os
import re
import socket
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm
from webdataset.tariterators import base_plus_ext

from datamodules.checks import ConfigError, check_path, check_sample_limits, check_shards
from datamodules.formats import RECAP_SCHEMA
from datamodules.io import TMP_MARK, _fsync_path, atomic_write, node_id, parse_temp_name, process_start, temp_path
from datamodules.shards import expand_urls, local_rank, rank_world, shard_stem

# The loader internals this job reuses, all imported here (datamodules/ is being reshaped: fix their names here).
# count_samples (datamodules.caption_mix, which imports lightning: seconds per process) is imported in _stats_count.
from datamodules.wds_stages import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_MEMBERS,
    MIN_IMAGE_SIZE,
    ImageRejected,
    ReadShards,
    SampleLimits,
    decode_image,
    iter_tar_members,
    open_shard,
)
from lightning_modules.components.llava import PAPER_RECAPTION_PROMPT as PAPER_PROMPT
from lightning_modules.components.llava import Generated, caption_prompt_text, eos_token_ids, greedy_captions

PROVENANCE = pa.schema(
    [(name, pa.string()) for name in ("model", "model_hash", "prompt", "decoding")]
    + [("n_generated_tokens", pa.int64()), ("hit_token_limit", pa.bool_()), ("retried", pa.bool_())]
    + [("status", pa.string()), ("error", pa.string())]
)
SCHEMA = pa.schema(list(RECAP_SCHEMA) + list(PROVENANCE))
MANIFEST = "_manifest.jsonl"
INPUT_ERRORS = "recap_suite.input_errors"  # unit-table metadata: what of the input could not become a row
SLICE_SIZE = b"recap_suite.slice_size"  # slice-output metadata: a later run keeps the split (shard_units)
RETRY_REPETITION_PENALTY = 1.3
DTYPES = ("bfloat16", "float16", "float32")
ON_DUPLICATE = ("error", "first")
# the device strings the backends use (`.to(device)`; vLLM's `cuda:N` -> CUDA_VISIBLE_DEVICES), matched by pattern so
# that checking a config does not import torch
_DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")
_PART = re.compile(r"^(?P<stem>.+)\.part(?P<part>\d{5})-of-(?P<parts>\d{5})$")


@dataclass(frozen=True)
class Unit:
    """A whole shard (``part is None``) or its samples ``[part * size, (part + 1) * size)`` in tar order; the last
    slice runs to the shard's end, so a sample count that is off (stats files can be) never loses a sample."""

    url: str
    part: int | None = None
    parts: int | None = None
    size: int | None = None

    @property
    def name(self) -> str:
        stem = shard_stem(self.url)
        return stem if self.part is None else f"{stem}.part{self.part:05d}-of-{self.parts:05d}"

    @property
    def start(self) -> int:
        return 0 if self.part is None else self.part * self.size

    @property
    def stop(self) -> int | None:
        return None if self.part is None or self.part == self.parts - 1 else (self.part + 1) * self.size


def _slices(out: Path, stem: str) -> dict[Path, re.Match]:
    found = ((p, _PART.match(p.stem)) for p in sorted(out.glob(f"{glob.escape(stem)}.part*-of-*.parquet")))
    return {p: m for p, m in found if m and m["stem"] == stem}


def _stats_count(url: str) -> int | None:
    """Samples in a shard from img2dataset's ``_stats.json`` / ``.parquet``; None without a well-formed one."""
    from datamodules.caption_mix import count_samples

    try:
        return count_samples([url])
    except Exception:  # no stats file, or a malformed one (e.g. "successes": null)
        return None


def shard_units(url: str, out: Path, slice_size: int | None) -> list[Unit]:
    """The units of one shard; a shard (partly) done under another split keeps it, so outputs never overlap."""
    stem = shard_stem(url)
    slices = _slices(out, stem)
    splits = {m["parts"] for m in slices.values()}
    if (out / f"{stem}.parquet").exists() or (not splits and slice_size is None):
        return [Unit(url)]
    if len(splits) > 1:
        raise ValueError(
            f"{out}: shard {stem} has slice outputs of different splits {sorted(splits)}; delete one set and rerun"
        )
    if splits:
        parts, size = int(splits.pop()), int(pq.read_schema(next(iter(slices))).metadata[SLICE_SIZE])
    else:
        n = _stats_count(url)
        n = n if n is not None else sum(1 for _ in _samples(url, []))  # no stats file: read the tar once
        parts, size = max(1, -(-n // slice_size)), slice_size
        if parts == 1:
            return [Unit(url)]
    return [Unit(url, k, parts, size) for k in range(parts)]


def pending_units(urls: Sequence[str], out: Path, rank: int, world: int, slice_size: int | None = None) -> list[Unit]:
    """Every unfinished unit in the order this rank tries them: its share (every ``world``-th by name, from ``rank``),
    then the others' shares from their end (their processes start at the front); the claims decide who does one."""
    units = [u for url in urls for u in shard_units(url, out, slice_size)]
    todo = sorted((u for u in units if not (out / f"{u.name}.parquet").exists()), key=lambda u: u.name)
    return todo[rank::world] + [u for i, u in reversed(list(enumerate(todo))) if i % world != rank]


def _expected_images(units: Sequence[Unit]) -> int | None:
    """Images in these units from the shards' stats files, for the bar's ETA (None when unknown)."""
    total = 0
    for u in units:
        if (n := _stats_count(u.url)) is None:  # stop at the first shard without stats (remote ones cost a request)
            return None
        total += (n if u.stop is None else min(n, u.stop)) - u.start
    return max(total, 0)


def model_hash(model_dir: str) -> str:
    """sha256 over the checkpoint's safetensors files (name + bytes): which weights wrote a caption."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def degenerate(text: str) -> str | None:
    """Why a caption is garbage (empty, or ending in an n-gram repeated 4+ times, n <= 6), or None."""
    words = text.split()
    if not words:
        return "empty caption"
    for n in range(1, 7):
        tail, reps, i = words[-n:], 1, len(words) - 2 * n
        while i >= 0 and words[i : i + n] == tail:
            reps, i = reps + 1, i - n
        if reps >= 4:
            return f"repetition loop ({n}-gram x{reps})"
    return None


class HFBackend:
    """Batched greedy captions with transformers (CPU or GPU): left padding, attention mask, KV cache."""

    def __init__(self, model_dir, prompt, max_new_tokens, device=None, dtype=None, trust_remote_code=False):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        # one process per GPU (torchrun / srun): LOCAL_RANK picks the card
        self.device = device or (f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
        kwargs = {"dtype": getattr(torch, dtype) if dtype in DTYPES else None, "trust_remote_code": trust_remote_code}
        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir, **kwargs).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.prompt_text = caption_prompt_text(self.processor.tokenizer, prompt)
        self.max_new_tokens = max_new_tokens

    def generate(self, images: Sequence[Any], repetition_penalty: float | None = None) -> list[Generated]:
        args = (self.prompt_text, images, self.max_new_tokens, self.device, repetition_penalty)
        return greedy_captions(self.model, self.processor, *args)


class VLLMBackend:
    """Greedy captions with vLLM (GPU only; ``pip install 'recap-suite[vllm]'``): the same prompt tokens, stop tokens
    and token limit as ``hf``. ``LOCAL_RANK`` picks the card; ``engine``: more ``vllm.LLM`` arguments."""

    def __init__(self, model_dir, prompt, max_new_tokens, device=None, dtype=None, trust_remote_code=False, **engine):
        try:
            import vllm
        except ImportError as exn:
            raise ImportError("backend 'vllm' needs vLLM on a GPU machine: pip install 'recap-suite[vllm]'") from exn
        from transformers import AutoTokenizer

        if device is not None and device.startswith("cuda:"):
            os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        elif "CUDA_VISIBLE_DEVICES" not in os.environ and ("LOCAL_RANK" in os.environ or "SLURM_LOCALID" in os.environ):
            os.environ["CUDA_VISIBLE_DEVICES"] = str(local_rank())
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        # vLLM tokenizes prompts with add_special_tokens=True: when the tokenizer adds <|begin_of_text|> itself, the
        # template's copy is dropped, so vLLM sees exactly the tokens hf does
        text, bos = caption_prompt_text(tok, prompt), tok.bos_token
        adds_bos = bos is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]
        self.prompt_text = text[len(bos) :] if adds_bos and text.startswith(bos) else text
        self.eos = eos_token_ids(tok)
        self.params = {"temperature": 0.0, "max_tokens": max_new_tokens, "stop_token_ids": self.eos}
        self._sampling = vllm.SamplingParams
        defaults = {"seed": 0, "max_num_seqs": 256, "gpu_memory_utilization": 0.9, "limit_mm_per_prompt": {"image": 1}}
        engine = defaults | engine
        self.llm = vllm.LLM(model=model_dir, dtype=dtype or "auto", trust_remote_code=trust_remote_code, **engine)

    def generate(self, images: Sequence[Any], repetition_penalty: float | None = None) -> list[Generated]:
        params = self._sampling(**self.params, skip_special_tokens=True, repetition_penalty=repetition_penalty or 1.0)
        requests = [{"prompt": self.prompt_text, "multi_modal_data": {"image": im}} for im in images]
        results = []
        for req in self.llm.generate(requests, params, use_tqdm=False):
            c = req.outputs[0]
            ids = list(c.token_ids)
            n = len(ids) - 1 if ids and ids[-1] in self.eos else len(ids)  # as hf: tokens before the end-of-turn
            results.append(Generated(c.text.strip(), n, c.finish_reason == "length"))
        return results


BACKENDS = {"hf": HFBackend, "vllm": VLLMBackend}


def _samples(url: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """The shard's samples as the training loader reads them; read errors are appended to ``errors``."""
    yield from ReadShards(lambda exn: errors.append(f"{type(exn).__name__}: {exn}") or True)([{"url": url}])


def _image(sample: dict[str, Any], limits: SampleLimits) -> Any:
    """The sample's image as RGB, decoded (and limited) as the training loader does; raises naming what is wrong."""
    for ext in IMAGE_MEMBERS:
        if ext in sample:
            try:
                return decode_image(sample[ext], limits.max_image_pixels, limits.min_image_size)
            except ImageRejected as exn:
                raise ValueError(f"{exn.reason}: {exn}") from exn
    raise ValueError(f"no image member (have {sorted(k for k in sample if not k.startswith('__'))})")


def _words(s: str | None) -> int | None:
    return len(s.split()) if s is not None else None


def _metadata(raw: bytes, key: str, fields: Sequence[str]) -> dict[str, Any]:
    """A sample's ``KEY.json``; raises ValueError naming it when it is not a UTF-8 JSON object or one of ``fields``
    (those a row takes) is not text."""
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exn:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{key}.json is not readable JSON ({type(exn).__name__}: {str(exn)[:200]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key}.json is a JSON {type(meta).__name__}, not an object")
    for field in fields:
        value = meta.get(field)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key}.json field {field!r} is a {type(value).__name__}, not text")
    return meta


def _base_row(sample: dict[str, Any], provenance: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The sample's row without the caption, and why its metadata cannot be read (None when it can)."""
    key = sample["__key__"]
    org = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
    fields = ("url", "sha256") if org is not None else ("url", "sha256", "caption")  # its caption: without txt
    meta, problem = {}, None
    if "json" in sample:
        try:
            meta = _metadata(sample["json"], key, fields)
        except ValueError as exn:
            problem = str(exn)
    org = org if org is not None else meta.get("caption")
    row = {"url": meta.get("url"), "org_caption": org, "sha256": meta.get("sha256"), "key": key}
    scores = dict.fromkeys(("re_clip_score", "org_clip_score", "re_gpt4v_score", "org_gpt4v_score"))
    return row | {"org_length": _words(org)} | scores | provenance, problem


def _error_row(row: dict[str, Any], why: str) -> dict[str, Any]:
    row.update(re_caption=None, re_length=None, n_generated_tokens=0, hit_token_limit=False, retried=False)
    return row | {"status": "error", "error": why}


def recaption_unit(
    unit: Unit | str, backend: Any, batch_size: int, provenance: dict, progress=None, limits=None
) -> pa.Table:
    """Caption one unit; every sample becomes exactly one row (a caption, or status ``error`` and the reason), once
    per key. ``progress(images, generated_tokens)`` is called after each batch. Repeated keys and damage that ended
    the shard early go to the schema metadata ``INPUT_ERRORS`` (``run`` copies it into the manifest)."""
    unit = Unit(unit) if isinstance(unit, str) else unit
    limits = limits or SampleLimits()
    rows: list[dict[str, Any]] = []
    batch: list[tuple[dict[str, Any], Any]] = []
    errors: list[str] = []
    seen: set[str] = set()

    def flush() -> None:
        if not batch:
            return
        results = backend.generate([im for _, im in batch])
        retried = [i for i, g in enumerate(results) if degenerate(g.text)]
        if retried:  # once more, with a repetition penalty, for the garbage only
            again = backend.generate([batch[i][1] for i in retried], repetition_penalty=RETRY_REPETITION_PENALTY)
            for i, g in zip(retried, again, strict=True):
                results[i] = g
        for j, ((row, _), g) in enumerate(zip(batch, results, strict=True)):
            why = degenerate(g.text)
            row.update(n_generated_tokens=g.n_tokens, hit_token_limit=g.hit_limit, retried=j in retried)
            if why is None:
                row.update(re_caption=g.text, re_length=_words(g.text), status="ok", error=None)
            else:  # never keep garbage as a caption: flagged, with the text for inspection
                row.update(re_caption=None, re_length=None, status="flagged", error=f"{why}: {g.text[:300]!r}")
            rows.append(row)
        if progress is not None:
            progress(len(batch), sum(g.n_tokens for g in results))
        batch.clear()

    # other slices' samples are read past without decoding
    for index, sample in itertools.islice(enumerate(_samples(unit.url, errors)), unit.start, unit.stop):
        if sample["__key__"] in seen:
            errors.append(f"duplicate key {sample['__key__']} (sample {index}) skipped")
            continue
        seen.add(sample["__key__"])
        row, problem = _base_row(sample, provenance)
        if problem is not None:  # unreadable metadata: still one complete row, keyed, with the reason
            rows.append(_error_row(row, f"metadata: {problem}"))
            continue
        try:
            batch.append((row, _image(sample, limits)))
        except Exception as exn:
            rows.append(_error_row(row, f"image: {type(exn).__name__}: {exn}"))
        if len(batch) >= batch_size:
            flush()
    flush()
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    if errors:  # a damaged shard: the samples read before the damage are kept; the damage is recorded
        print(f"recaption: {unit.url}: {'; '.join(errors)}", file=sys.stderr)
        table = table.replace_schema_metadata({INPUT_ERRORS: json.dumps(errors)})
    return table


def input_errors(table: pa.Table) -> list[str]:
    raw = (table.schema.metadata or {}).get(INPUT_ERRORS.encode())
    return json.loads(raw) if raw else []


# --------------------------------------------------------------------------------- claims: who works on which unit
CLAIMS = "_claims"  # <out>/_claims/<unit>.claim: the unit is being worked on by the process named inside
DEFAULT_CLAIM_TTL = 300.0  # seconds without a heartbeat after which a claim is expired (heartbeat: every ttl / 10)
_STARTED_AT = time.time()  # about when this process started (the claim records it for people; pids use /proc)
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _owner_gone(node: str | None, pid: Any, start: Any) -> bool | None:
    """Whether the process ``(node, pid, start)`` is gone (pid dead, exited or reused: started at another time);
    None when that cannot be told from here (another node, an old-style temporary name, no pid)."""
    if node is None or node != node_id() or not _is_int(pid) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it exists
        pass
    now = process_start(pid)
    if now is None:
        return Path("/proc/self/stat").exists()  # Linux: it exited meanwhile or is a zombie; elsewhere: unknown, alive
    return _is_int(start) and start > 0 and now != start


def _write_synced(f: Any, content: bytes) -> None:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())


def _link(tmp: Path, path: Path) -> bool | None:
    """``link(2)`` ``tmp`` to ``path`` (never replaces a file): whether this call made ``path``; None where the file
    system has no hard links."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:  # NFS: a retransmitted LINK can answer EEXIST although it worked (open(2))
        return os.stat(tmp).st_nlink == 2
    except OSError as exn:
        if exn.errno not in _NO_HARD_LINKS:
            raise
        return None


class _Claim:
    """A claim this process holds on one unit: a heartbeat thread refreshes the claim file's mtime every
    ``interval`` seconds and notices when the file is no longer this claim (taken over after it expired)."""

    def __init__(self, path: Path, token: str, interval: float):
        self.path, self.token, self.lost = path, token, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval,), name=f"claim {path.stem}", daemon=True)
        self._thread.start()

    def _mine(self) -> bool:
        current = ClaimBoard.read(self.path)
        return current is not None and current[0].get("token") == self.token

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if not self._mine():
                self.lost = True
                return
            with contextlib.suppress(OSError):  # the heartbeat: the file's mtime (on NFS set by the server's clock)
                os.utime(self.path)

    def held(self) -> bool:  # checked now, also between heartbeats
        return not self.lost and self._mine()

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._mine():
            self.path.unlink(missing_ok=True)


class ClaimBoard:
    """Claims on the units of one output folder: ``<out>/_claims/<unit>.claim``, made atomically by ``link(2)`` of a
    private file, its mtime the heartbeat, expired when its owner is gone or its heartbeat older than ``ttl`` seconds
    (docs/recaption.md, "Exactly once, under any restart")."""

    def __init__(self, out: Path, ttl: float = DEFAULT_CLAIM_TTL, log: Callable[[str], None] | None = None):
        self.dir = Path(out) / CLAIMS
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ttl = float(ttl)
        self.poll = min(max(self.ttl / 60, 0.2), 10.0)  # how often a process waiting for others' claims looks again
        self.log = log or (lambda line: None)
        start = process_start(os.getpid()) or 0
        self.me = {"host": socket.gethostname(), "node": node_id(), "pid": os.getpid(), "start": start}
        self.me["started_at"] = round(_STARTED_AT, 3)

    def path(self, unit: str) -> Path:
        return self.dir / f"{unit}.claim"

    @staticmethod
    def read(path: Path) -> tuple[dict[str, Any], os.stat_result] | None:
        """A claim's content ({} while it is being written, or unreadable) and stat; None when there is none."""
        with contextlib.suppress(FileNotFoundError):
            try:
                info = json.loads(path.read_bytes())
            except (OSError, ValueError):
                info = {}
            return (info if isinstance(info, dict) else {}), os.stat(path)
        return None

    def expired(self, info: dict[str, Any], st: os.stat_result) -> bool:
        if _owner_gone(info.get("node"), info.get("pid"), info.get("start")):
            return True
        return time.time() - st.st_mtime > self.ttl  # clock skew between nodes must stay well below ttl

    def _create(self, path: Path, content: bytes) -> bool:
        """Make ``path`` with ``content`` atomically unless it exists; True when this call made it."""
        private = temp_path(path)  # names this process, so a sweep can remove it if this process dies here
        try:
            with open(private, "xb") as f:
                _write_synced(f, content)
            made = _link(private, path)
            if made is not None:
                return made
            try:  # no hard links here: O_EXCL (a reader may see the file empty for a moment: read() allows it)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                _write_synced(f, content)
            return True
        finally:
            private.unlink(missing_ok=True)

    def _move_aside(self, path: Path, judged: dict[str, Any]) -> bool:
        """Remove the expired claim ``judged`` from ``path``; False when ``path`` turned out to hold a live claim
        (replaced, or refreshed, since it was judged), which is then put back."""
        grave = temp_path(path)
        try:
            os.rename(path, grave)  # of several processes taking over, one moves it
        except FileNotFoundError:
            return True  # released or moved by another process meanwhile: free to claim
        moved = self.read(grave)
        if moved is not None and not (moved[0].get("token") == judged.get("token") and self.expired(*moved)):
            with contextlib.suppress(OSError):  # a live claim was moved: put it back, unless a new one is there
                os.link(grave, path)
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        if judged:
            owner = f"{judged.get('host')}:{judged.get('pid')}"
            self.log(f"recaption: took over the expired claim on {path.stem} of {owner}")
        return True

    def acquire(self, unit: str) -> _Claim | None:
        """Claim ``unit`` for this process, taking over an expired claim; None when a live process holds it."""
        path = self.path(unit)
        for _ in range(3):  # a look first: a process waiting on live claims writes nothing
            current = self.read(path)
            if current is not None and (not self.expired(*current) or not self._move_aside(path, current[0])):
                return None
            token = uuid.uuid4().hex
            content = json.dumps(self.me | {"unit": unit, "token": token, "claimed_at": round(time.time(), 3)})
            if self._create(path, content.encode()):
                return _Claim(path, token, self.ttl / 10)  # the heartbeat interval
        return None

    def holder(self, unit: str) -> str:
        """Who holds ``unit``'s claim, for messages: ``host:pid``, or ``?``."""
        info = (self.read(self.path(unit)) or ({},))[0]
        return f"{info.get('host')}:{info.get('pid')}" if info else "?"

    def sweep(self, out: Path, done: Callable[[str], bool]) -> dict[str, int]:
        """Remove what killed processes left: stale temporaries (unit outputs, claim files) and expired claims of
        finished units; returns the counts."""
        counts = {"temporaries": 0, "claims": 0}
        for folder, kind in ((out, "temporaries"), (self.dir, "claims")):
            for p in folder.glob(f".*{TMP_MARK}*"):
                owner = parse_temp_name(p.name)
                if owner is not None and self.temp_is_stale(p, owner):
                    p.unlink(missing_ok=True)
                    counts[kind] += 1
        for p in self.dir.glob("*.claim"):
            current = self.read(p)
            if done(p.stem) and current is not None and self.expired(*current):
                p.unlink(missing_ok=True)
                counts["claims"] += 1
        return counts

    def temp_is_stale(self, path: Path, owner: Any) -> bool:
        """Whether the temporary ``path`` of ``owner`` (a ``TempOwner``) will never be renamed into place (the rules:
        docs/recaption.md, "Leftovers of killed writers")."""
        gone = _owner_gone(owner.node, owner.pid, owner.start)
        if gone is not None:
            return gone
        unit = owner.target.removesuffix(".parquet")
        current = self.read(self.path(unit)) if unit != owner.target else None
        writer = (current[0].get("node"), current[0].get("pid")) if current is not None else None
        if writer == (owner.node, owner.pid) and not self.expired(*current):
            return False
        try:
            return time.time() - path.stat().st_mtime > self.ttl
        except FileNotFoundError:
            return False


def _publish(table: pa.Table, path: Path) -> bool:
    """Write ``table`` to ``path`` unless it exists (a private temporary, fsync, ``link(2)``: of two copies of a unit
    the first stays); True when this call published it."""
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp)
        _fsync_path(tmp)
        made = _link(tmp, path)
        if made is None and not path.exists():  # no hard links here: exists-check and rename (a narrow window remains)
            os.replace(tmp, path)
            made = True
        if made:
            _fsync_path(path.parent, directory=True)
        return bool(made)
    finally:
        tmp.unlink(missing_ok=True)


def run(
    model: str,
    shards: str | Sequence[str],
    out: str | os.PathLike,
    prompt: str = PAPER_PROMPT,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    rank: int | None = None,
    world_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "hf",
    slice_size: int | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    min_image_size: int | None = MIN_IMAGE_SIZE,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    claim_ttl: float = DEFAULT_CLAIM_TTL,
) -> dict[str, Any]:
    """Caption unfinished units, claiming each (``ClaimBoard``), until every unit is finished by this process or
    others; returns this process's totals. ``rank`` / ``world_size`` (else the environment's) only order the work;
    the image limits are the training loader's (None = off)."""
    problems = run_config_problems(dict(locals()))  # locals() here: exactly the arguments (RUN_KEYS)
    if problems:  # before the model loads or `out` is created (main reports them all, with where each was set)
        raise ConfigError(*problems[0])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_urls(shards)
    names = [shard_stem(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"shard names must be unique (outputs are named after them): {sorted(names)[:5]}...")
    rank, world = rank_world(rank, world_size)
    todo = pending_units(urls, out, rank, world, slice_size)
    first = todo[: len(range(rank, len(todo), world))]  # this rank's share, which it starts with
    tag = f"[{rank}/{world} {socket.gethostname()}:{os.getpid()}]"
    total = _expected_images(first) if progress else None
    every = 0.5 if sys.stderr.isatty() else 30.0  # off a terminal (SLURM logs) the bar refreshes every 30 s
    bar = tqdm(total=total, desc=f"recaption {tag}", unit="img", disable=not progress, mininterval=every)
    log = bar.write if progress else functools.partial(print, flush=True)
    tokens_made = 0

    def advance(images: int, tokens: int) -> None:
        nonlocal tokens_made
        tokens_made += tokens
        bar.set_postfix_str(f"{tokens_made / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s", refresh=False)
        bar.update(images)

    board = ClaimBoard(out, claim_ttl, log)

    def done(unit_name: str) -> bool:
        return (out / f"{unit_name}.parquet").exists()

    swept = board.sweep(out, done)
    if any(swept.values()):
        log(f"recaption {tag}: removed {swept['temporaries']} temporaries, {swept['claims']} claims of processes gone")
    limits = SampleLimits(min_image_size=min_image_size, max_image_pixels=max_image_pixels)
    engine = None  # no model is loaded when nothing is left to do
    if todo:
        engine = BACKENDS[backend](model, prompt, max_new_tokens, device, dtype, trust_remote_code=trust_remote_code)
    decoding = {"strategy": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size, "backend": backend}
    decoding["retry_repetition_penalty"] = RETRY_REPETITION_PENALTY
    provenance = {"model": model, "model_hash": model_hash(model), "prompt": prompt, "decoding": json.dumps(decoding)}
    who = {"rank": rank, "world_size": world, "host": board.me["host"], "pid": board.me["pid"]}

    totals = {"units": 0, "rows": 0, "errors": 0, "tokens": 0, "seconds": 0.0}

    def finish(unit: Unit, claim: _Claim) -> bool:
        """Caption, publish, log and count ``unit``; False (nothing written) when the claim was lost meanwhile (taken
        over after it expired: this process was paused, or its heartbeats were lost) or another copy was published
        first."""
        t0 = time.perf_counter()
        table = recaption_unit(unit, engine, batch_size, provenance, advance if progress else None, limits)
        if unit.part is not None:  # a later run keeps this split (shard_units)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), SLICE_SIZE: str(unit.size)})
        # the manifest record is made before the output is published: once the parquet exists, nothing but the
        # append itself stands between it and its manifest line
        n_err = sum(s != "ok" for s in table.column("status").to_pylist())
        tokens = sum(n or 0 for n in table.column("n_generated_tokens").to_pylist())
        record = {"unit": unit.name, "url": unit.url, "rows": table.num_rows, "errors": n_err, "tokens": tokens}
        if problems := input_errors(table):
            record["input_errors"] = problems
        try:
            if not claim.held() or not _publish(table, out / f"{unit.name}.parquet"):
                return False
        except FileNotFoundError:  # the temporary was removed: another process judged this writer gone
            if claim.held():
                raise
            return False
        dt, rows = time.perf_counter() - t0, table.num_rows
        with open(out / MANIFEST, "a") as f:  # one short O_APPEND write per finished unit
            f.write(json.dumps(record | {"seconds": round(dt, 3)} | who) + "\n")
        for key, value in zip(totals, (1, rows, n_err, tokens, dt), strict=True):
            totals[key] += value
        left = sum(not done(u.name) for u in todo)
        rates = f"{rows / dt:.1f} img/s, {tokens / dt:.0f} tok/s"
        log(f"recaption {tag} {unit.name}: {rows} rows, {rates}, {n_err} errors/flagged; {left} units left")
        return True

    log(f"recaption {tag}: {len(todo)} units unfinished in {out}, {len(first)} first ({backend}, batch {batch_size})")
    remaining, waiting = list(todo), False
    try:
        while remaining:
            took = False
            for unit in remaining:
                if done(unit.name) or (claim := board.acquire(unit.name)) is None:  # done, or a live process on it
                    continue
                took, waiting = True, False
                try:  # a unit done now was finished (and released) between the look and the claim
                    if not done(unit.name) and not finish(unit, claim):
                        log(
                            f"recaption {tag} {unit.name}: finished first by another process (this claim had "
                            "expired); that output is kept, this copy dropped"
                        )
                finally:
                    claim.release()
            remaining = [u for u in remaining if not done(u.name)]
            if remaining and not took:
                if not waiting:
                    held = ", ".join(f"{u.name} ({board.holder(u.name)})" for u in remaining[:5])
                    more = ", ..." if len(remaining) > 5 else ""
                    log(
                        f"recaption {tag}: waiting for {len(remaining)} units claimed by other processes: {held}{more} "
                        f"(they finish them, or their claims expire after {board.ttl:g} s without a heartbeat)"
                    )
                    waiting = True
                time.sleep(board.poll)
    finally:
        bar.close()
    board.sweep(out, done)
    return totals


def _completeness(files: Sequence[Path], stems: set[str] | None) -> list[str]:
    """Shards with both a whole and slice outputs, an incomplete set of slices and (``stems``) no output at all."""
    whole, parts = set(), {}
    for f in files:
        m = _PART.match(f.stem)
        if m is None:
            whole.add(f.stem)
        else:
            parts.setdefault(m["stem"], {}).setdefault(int(m["parts"]), set()).add(int(m["part"]))
    problems = [f"{s}: both a whole-shard output and slices" for s in sorted(whole & set(parts))]
    for stem, splits in sorted(parts.items()):
        if len(splits) > 1:
            problems.append(f"{stem}: slices of different splits {sorted(splits)}")
        for n, got in splits.items():
            if len(got) != n and (stems is not None or stem in whole):
                problems.append(f"{stem}: {n - len(got)} of {n} slices missing")
    if stems is not None:
        problems += [f"{s}: no output" for s in sorted(stems - whole - set(parts))]
    return problems


def _unit_order(files: Sequence[Path], urls: Sequence[str] | None) -> list[Path]:
    """The unit outputs in merge order, which decides which copy of a duplicate key is "first": the order of
    ``--shards`` as expanded (other shards after those, by name), then slice order within a shard."""
    rank = {}
    for i, url in enumerate(urls or []):
        rank.setdefault(shard_stem(url), i)

    def position(f: Path) -> tuple[int, str, int]:
        m = _PART.match(f.stem)
        stem, part = (m["stem"], int(m["part"])) if m else (f.stem, -1)
        return rank.get(stem, len(rank)), stem, part

    return sorted(files, key=position)


def merge(out: str | os.PathLike, dest=None, shards: str | None = None, on_duplicate="error", log=print) -> Path:
    """Concatenate the unit parquets into ``dest`` (default ``<out>/merged/recap.parquet``); with ``shards``, refuse
    missing units. A key in several rows is refused (``on_duplicate="error"``) or kept once (``"first"``): its first
    row in ``_unit_order``, then row order, every dropped row listed in ``<dest stem>.duplicates.csv`` (written, maybe
    empty, on every such merge; docs/recaption.md, "Duplicate keys")."""
    if on_duplicate not in ON_DUPLICATE:
        raise ValueError(f"on_duplicate must be one of {', '.join(ON_DUPLICATE)}, not {on_duplicate!r}")
    out = Path(out)
    files = [p for p in out.glob("*.parquet") if not p.name.startswith((".", "_"))]
    urls = expand_urls(shards) if shards is not None else None
    problems = _completeness(files, {shard_stem(u) for u in urls} if urls is not None else None)
    if problems:
        raise ValueError(f"{out}: {len(problems)} shards are not complete (rerun `recaption run`): {problems[:5]}")
    files = _unit_order(files, urls)
    tables = [pq.read_table(p, schema=SCHEMA) for p in files]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    where = [(f.stem, row) for f, t in zip(files, tables, strict=True) for row in range(t.num_rows)]
    keys = table.column("key").to_pylist()
    first: dict[str, int] = {}
    dropped = [(i, j) for i, key in enumerate(keys) if (j := first.setdefault(key, i)) != i]  # (row, row it repeats)
    dest = Path(dest) if dest is not None else out / "merged" / "recap.parquet"
    report = dest.with_name(f"{dest.stem}.duplicates.csv")
    if dropped and on_duplicate == "error":
        (i, j), n_keys = dropped[0], len({keys[i] for i, _ in dropped})
        raise ValueError(
            f"{out}: {n_keys} keys occur in more than one row ({len(dropped)} extra rows), e.g. {keys[i]!r} in units "
            f"{where[j][0]} (row {where[j][1]}) and {where[i][0]} (row {where[i][1]}); a shard downloaded twice or "
            f"partly copied does this. To keep each key's first row (shard order, then row order) and list every "
            f"dropped row in {report}, rerun with --on-duplicate first"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    if on_duplicate == "first":
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(
            [("key", "dropped_unit", "dropped_row", "kept_unit", "kept_row")]
            + [(keys[i], *where[i], *where[j]) for i, j in dropped]
        )
        atomic_write(report, text.getvalue())
        table = table.take(sorted(first.values()))  # each key's first row, in row order
        if log is not None:
            log(
                f"merge: {len(dropped)} duplicate rows dropped ({len(first)} keys kept, each its first row in shard "
                f"order, then row order); listed in {report}"
            )
    table = table.replace_schema_metadata(None)
    atomic_write(dest, lambda tmp: pq.write_table(table, tmp))
    return dest


def _copy_shard_with_member(url: str, path: Path, captions: dict[str, str], member: str) -> tuple[int, int]:
    """Copy shard ``url`` to ``path`` member by member, adding ``KEY.<member>`` after each sample with a caption."""
    counts = [0, 0]
    with contextlib.closing(open_shard(url)) as stream, tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))

        # webdataset's key; a sample's members are contiguous
        for key, members in itertools.groupby(iter_tar_members(stream, url), lambda m: base_plus_ext(m[0])[0] or m[0]):
            for name, data in members:
                add(name, data)
            counts[0] += 1
            if key in captions:
                add(f"{key}.{member}", captions[key].encode("utf-8"))
                counts[1] += 1
    return counts[0], counts[1]


def write_shards(
    out: str | os.PathLike, shards: str | Sequence[str], dest: str | os.PathLike, member: str = "recap.txt"
) -> dict[str, int]:
    """The input shards with each sample's recaption as one more member (``KEY.recap.txt``; none without one, the
    DataModule then falls back to the original), other members byte for byte, each shard atomically, with its stats."""
    out, dest = Path(out), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    totals = {"shards": 0, "samples": 0, "with_recaption": 0, "skipped_shards": 0}
    for url in expand_urls(shards):
        stem = shard_stem(url)
        target = dest / f"{stem}.tar"
        if target.exists():
            totals["skipped_shards"] += 1
            continue
        units = sorted(out.glob(f"{glob.escape(stem)}.parquet")) + list(_slices(out, stem))
        problems = _completeness(units, {stem})
        if problems:
            raise ValueError(f"{out}: no complete recaption output for shard {url}: {problems[0]}")
        captions: dict[str, str] = {}
        for f in units:
            t = pq.read_table(f, columns=["key", "re_caption", "status"]).to_pylist()
            captions.update({r["key"]: r["re_caption"] for r in t if r["status"] == "ok" and r["re_caption"]})

        def write(tmp: Path, url: str = url, captions: dict[str, str] = captions, stem: str = stem) -> None:
            n, n_recap = _copy_shard_with_member(url, tmp, captions, member)
            totals["samples"] += n
            totals["with_recaption"] += n_recap
            with contextlib.suppress(OSError), fsspec.open(url[: -len(".tar")] + "_stats.json", "r") as f:
                (dest / f"{stem}_stats.json").write_text(f.read())  # before the shard: a finished one has its stats

        atomic_write(target, write)
        totals["shards"] += 1
    return totals


# ------------------------------------------------------------------------------------------- the run's settings
class RunConfigError(ConfigError):
    """A ``recaption run`` setting that cannot work, with where it was set (a YAML file, ``command line``)."""

    def __init__(self, key: str, value: Any, problem: str, where: str):
        self.where = where
        super().__init__(key, value, problem)

    def __str__(self) -> str:
        return f"config error: {self.key} = {self.value!r}: {self.problem} (in {self.where})"


# run()'s own defaults for the run flags (None for the required ones)
_RUN_DEFAULTS = {k: None if p.default is p.empty else p.default for k, p in inspect.signature(run).parameters.items()}
RUN_KEYS = tuple(_RUN_DEFAULTS)


def _load_config(path: str) -> dict[str, Any]:
    """A recaption YAML (``experiments/configs/recaption/*.yaml``): the ``run`` flags as keys (``-`` or ``_``)."""
    import difflib

    import yaml

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except OSError as exn:
        raise RunConfigError("--config", path, f"cannot be read ({exn.strerror})", "command line") from None
    except yaml.YAMLError as exn:
        mark = getattr(exn, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        why = getattr(exn, "problem", None) or str(exn).splitlines()[0]
        raise RunConfigError("--config", path, f"is not valid YAML{at}: {why}", path) from None
    if not isinstance(cfg, dict | None):  # an empty file (None) sets nothing
        why = f"must be a mapping of run flags to values, not a {type(cfg).__name__}"
        raise RunConfigError("--config", path, why, path)
    out: dict[str, Any] = {}
    for raw, value in (cfg or {}).items():
        key = str(raw).replace("-", "_")
        if key in out:
            raise RunConfigError(str(raw), value, f"is set twice (also as {key})", path)
        out[key] = value
    unknown = [k for k in out if k not in RUN_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], RUN_KEYS, n=1)  # stdlib's did-you-mean
        hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(RUN_KEYS)}"
        more = f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
        raise RunConfigError(unknown[0], out[unknown[0]], f"is not a recaption run key; {hint}{more}", path)
    return out


def _at_least(low: int, unset_ok: bool = False) -> Callable[[Any], bool]:
    return lambda v: (unset_ok and v is None) or (_is_int(v) and v >= low)


# run key -> (whether a value works, why not); model, shards, out, the image limits and the ranks' relation below
_RULES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "prompt": (lambda v: isinstance(v, str) and v.strip(), "must be a non-empty string"),
    "max_new_tokens": (_at_least(1), "must be an integer >= 1"),
    "batch_size": (_at_least(1), "must be an integer >= 1"),
    "slice_size": (_at_least(1, unset_ok=True), "must be an integer >= 1 (or unset: whole shards)"),
    "rank": (_at_least(0, unset_ok=True), "must be an integer >= 0"),
    "world_size": (_at_least(1, unset_ok=True), "must be an integer >= 1"),
    "backend": (lambda v: v in BACKENDS, f"must be one of {', '.join(sorted(BACKENDS))}"),
    "device": (
        lambda v: v is None or (isinstance(v, str) and _DEVICE.match(v)),
        "must be cpu, cuda, cuda:N, mps, xpu or xpu:N (or unset: this rank's GPU, else cpu)",
    ),
    "dtype": (lambda v: v is None or v in DTYPES, f"must be one of {', '.join(DTYPES)} (or unset: the checkpoint's)"),
    "trust_remote_code": (lambda v: isinstance(v, bool), "must be true or false"),
    "progress": (lambda v: isinstance(v, bool), "must be true or false"),
    "claim_ttl": (
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf"),
        "must be a number of seconds > 0 (how long a claim lives without a heartbeat)",
    ),
}


def run_config_problems(args: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Every problem of resolved ``run`` arguments (``RUN_KEYS``) as ``(key, value, why)``, found without loading the
    model or writing anything (hub names, URLs and ``pipe:`` shards are left to the run)."""
    problems: list[tuple[str, Any, str]] = []

    def check(rule: Callable[..., Any], *rule_args: Any, **kw: Any) -> bool:  # datamodules/checks.py's rules
        try:
            rule(*rule_args, **kw)
            return True
        except ConfigError as e:
            problems.append((e.key, e.value, e.problem))
            return False

    model, shards, out = args.get("model"), args.get("shards"), args.get("out")
    what = "a llava-hf checkpoint (export-captioner writes one)"
    if not isinstance(model, str | os.PathLike) or not os.fspath(model):
        problems.append(("model", model, "must be a llava-hf folder or a hub name (org/name)"))
    elif check(check_path, "model", model, "dir", hub_ok=True, what=what):
        folder = Path(model).expanduser()
        if folder.is_dir() and not (folder / "config.json").is_file():
            problems.append(("model", os.fspath(model), "is not a llava-hf folder (it has no config.json)"))
    if isinstance(shards, list | tuple) and shards and all(isinstance(s, str | os.PathLike) for s in shards):
        check(check_shards, "shards", [os.fspath(s) for s in shards])
    elif isinstance(shards, str | os.PathLike):
        check(check_shards, "shards", shards)
    else:
        why = "must be a shard spec (braces, globs, a folder, '::' list) or a list of them"
        problems.append(("shards", shards, why))
    if not isinstance(out, str | os.PathLike) or not os.fspath(out):
        problems.append(("out", out, "must be a folder path"))
    else:
        path = Path(out).expanduser()
        above = next((p for p in (path, *path.parents) if p.exists()), None)
        if path.exists() and not path.is_dir():
            problems.append(("out", os.fspath(out), "must be a folder (a file is there)"))
        elif above is not None and not above.is_dir():
            problems.append(("out", os.fspath(out), f"cannot be created: {above} is a file"))
    problems += [(key, args.get(key), why) for key, (ok, why) in _RULES.items() if not ok(args.get(key))]
    check(check_sample_limits, args.get("min_image_size"), args.get("max_image_pixels"), None)  # the loader's rules
    bad = {key for key, _, _ in problems}
    if not bad & {"rank", "world_size"}:
        try:
            rank_world(args.get("rank"), args.get("world_size"))
        except ValueError as exn:  # rank >= world size once $RANK / $WORLD_SIZE (or SLURM's) fill in the rest
            problems.append(("rank", args.get("rank"), f"{exn} (rank must be < world_size)"))
    device = args.get("device")
    if args.get("backend") == "vllm" and "device" not in bad and device is not None and not device.startswith("cuda"):
        problems.append(("device", device, "must be cuda or cuda:N with backend vllm (GPU only)"))
    return problems


_UNSET = object()  # a run flag not given on the command line
# run flag -> (type, help); the defaults are run()'s own
_RUN_FLAGS = {
    "model": (str, "llava-hf folder (export-captioner output) or hub name"),
    "shards": (str, "shard paths: braces, globs, a directory or a '::' list"),
    "out": (str, "output folder (one parquet per shard)"),
    "prompt": (str, "default: the paper's recaption prompt"),
    "max_new_tokens": (int, "default: 128"),
    "batch_size": (int, "default: 32"),
    "rank": (int, "where to start (a hint; units are claimed): $RANK / $SLURM_PROCID / 0"),
    "world_size": (int, "default: $WORLD_SIZE / $SLURM_NTASKS / 1"),
    "device": (str, "cpu, cuda, cuda:N, mps, xpu[:N] (default: this rank's GPU, else cpu)"),
    "dtype": (str, f"{' | '.join(DTYPES)} (default: the checkpoint's)"),
    "backend": (str, "hf (CPU/GPU, the default) or vllm (GPU, optional)"),
    "slice_size": (int, "split shards into units of this many samples"),
    "min_image_size": (int, f"skip images whose shorter side is below this (default: {MIN_IMAGE_SIZE})"),
    "max_image_pixels": (int, f"skip images with more pixels, before decoding (default: {DEFAULT_MAX_IMAGE_PIXELS})"),
    "claim_ttl": (
        float,
        f"seconds without a heartbeat before a unit's claim is taken over (default: {DEFAULT_CLAIM_TTL:g})",
    ),
}


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``recaption`` parser and its ``run`` subparser, whose flags default to ``_UNSET`` (``main`` needs to know
    which were given)."""
    parser = argparse.ArgumentParser(prog="python -m experiments recaption", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="caption the unfinished units, claiming each (resumable; any number of processes)")
    r.add_argument("--config", default=None, help="YAML with these flags as keys; flags given here override it")
    for key, (kind, why) in _RUN_FLAGS.items():
        r.add_argument("--" + key.replace("_", "-"), type=kind, help=why)
    r.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code (off)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (unit lines only)")
    r.set_defaults(**dict.fromkeys(RUN_KEYS, _UNSET))
    m = sub.add_parser("merge", help="check every key occurs once and write the dataset-level parquet")
    m.add_argument("--out", required=True)
    m.add_argument("--dest", default=None)
    m.add_argument("--shards", default=None, help="also require an output for each of these shards")
    why = "a key in several rows (a shard downloaded twice): refuse (error, the default) or keep its first row in"
    why += " shard order, then row order, and list every dropped row in <dest stem>.duplicates.csv (first)"
    m.add_argument("--on-duplicate", choices=ON_DUPLICATE, default="error", help=why)
    w = sub.add_parser("shards", help="write new shards with each sample's recaption as a KEY.recap.txt member")
    w.add_argument("--out", required=True, help="the recaption run's output folder")
    w.add_argument("--shards", required=True, help="the input shards that were recaptioned")
    w.add_argument("--dest", required=True, help="folder for the new shards")
    w.add_argument("--member", default="recap.txt")
    return parser, r


def _refuse(lines: Sequence[str]) -> NoReturn:
    """Print the config errors and exit with code 2 (nothing has been loaded or written)."""
    print("\n".join(lines), file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> Any:
    parser, r = _parser()
    args = parser.parse_args(argv)
    if args.command == "shards":
        totals = write_shards(args.out, args.shards, args.dest, args.member)
        print(f"shards -> {args.dest}: {json.dumps(totals)}")
        return totals
    if args.command == "merge":
        path = merge(args.out, args.dest, args.shards, args.on_duplicate)
        print(f"merged -> {path}")
        return path
    # run: run()'s defaults < the --config file < flags on the command line
    try:
        cfg = _load_config(args.config) if args.config else {}
    except RunConfigError as e:
        _refuse([str(e)])
    given = {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k) is not _UNSET}
    values = _RUN_DEFAULTS | cfg | given
    missing = [k for k in ("model", "shards", "out") if values[k] is None]
    if missing:
        r.error(f"recaption run needs {', '.join('--' + k for k in missing)} (flags or --config)")

    def where(key: str) -> tuple[str, str]:  # the name the user wrote, and where
        if key in given:
            return "--" + key.replace("_", "-"), "command line"
        return key, args.config if key in cfg else "defaults"

    lines = []
    for key, value, why in run_config_problems(values):
        name, source = where(key)
        if key == "rank" and value is None:  # the rank came from the environment: name the setting that conflicts
            if values["world_size"] is not None:
                (name, source), value = where("world_size"), values["world_size"]
            else:
                name, source = "rank", "environment: RANK / WORLD_SIZE or SLURM_PROCID / SLURM_NTASKS"
                value = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
        lines.append(str(RunConfigError(name, value, why, source)))
    if lines:
        _refuse(lines)
    totals = run(**values)
    print(f"recaption done: {json.dumps(totals)}")
    return totals
