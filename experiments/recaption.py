"""``python -m experiments recaption``: recaption image shards with a llava-hf captioner, exactly once, resumably.

Work is assigned by whole shard. Each shard's captions go to ``<out>/<shard stem>.parquet`` in the Recap-DataComp-1B
schema plus provenance columns, written to a temporary file and renamed into place, so a shard's output either
exists complete or not at all. A (re)started process lists the shards, skips those whose output exists, and takes
every ``world_size``-th of the rest (``rank``; from ``RANK``/``WORLD_SIZE`` as torchrun and SLURM set them, or flags),
so a restart with any number of processes redoes exactly the unfinished shards: no caption is lost or duplicated.
``merge`` then checks that every key occurs once and writes the dataset-level parquet, which ``python -m experiments
sidecars --recap`` joins onto the shards for the caption-mix DataModule.

    python -m experiments recaption run --model runs/tiny/captioner/hf --shards 'data/world/web/*.tar' \
        --out data/world/recap_llava
    python -m experiments recaption merge --out data/world/recap_llava

Decoding is the paper's: greedy, at most 128 new tokens, the recaption prompt, batched with left padding and the KV
cache, stopping at the end-of-turn token. Empty captions and repetition loops are decoded once more with a
repetition penalty (``retried``); what still fails is kept out of ``re_caption`` and flagged (``status`` ``flagged``,
the reason and the text in ``error``). A sample whose image cannot be decoded becomes a row with ``status`` ``error``
and the reason; the job goes on.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from datamodules.tiny_world.recaption import RECAP_SCHEMA
from lightning_modules.components.llava import PAPER_RECAPTION_PROMPT, Generated, caption_prompt_text, greedy_captions

PAPER_PROMPT = PAPER_RECAPTION_PROMPT
PROVENANCE = pa.schema(
    [
        ("model", pa.string()),
        ("model_hash", pa.string()),
        ("prompt", pa.string()),
        ("decoding", pa.string()),
        ("n_generated_tokens", pa.int64()),
        ("hit_token_limit", pa.bool_()),
        ("retried", pa.bool_()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
SCHEMA = pa.schema(list(RECAP_SCHEMA) + list(PROVENANCE))
MANIFEST = "_manifest.jsonl"


def unit_name(url: str) -> str:
    """The output stem of a shard: its file name without ``.tar`` (img2dataset's shard stems are unique)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".tar")] if name.endswith(".tar") else name


def rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))) if world_size is None else world_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world_size {world}")
    return rank, world


def pending_units(urls: Sequence[str], out: Path, rank: int, world: int) -> list[str]:
    """The shards this rank owns in this run: unfinished ones, every ``world``-th in sorted name order."""
    todo = sorted((u for u in urls if not (out / f"{unit_name(u)}.parquet").exists()), key=unit_name)
    return todo[rank::world]


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


RETRY_REPETITION_PENALTY = 1.3


class HFBackend:
    """Batched greedy captions with transformers (CPU or GPU): left padding, attention mask, KV cache."""

    def __init__(self, model_dir: str, prompt: str, max_new_tokens: int, device: str | None = None,
                 dtype: str | None = None):  # fmt: skip
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        # one process per GPU (torchrun / srun): LOCAL_RANK picks the card
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        self.device = device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype or "")
        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.prompt_text = caption_prompt_text(self.processor.tokenizer, prompt)
        self.max_new_tokens = max_new_tokens

    def generate(self, images: Sequence[Any], repetition_penalty: float | None = None) -> list[Generated]:
        return greedy_captions(
            self.model, self.processor, self.prompt_text, images, self.max_new_tokens, self.device, repetition_penalty
        )


def _samples(url: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    from datamodules.wds_stages import ReadShards

    def handler(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {exn}")
        return True

    yield from ReadShards(handler)([{"url": url}])


def _image(sample: dict[str, Any]) -> Any:
    from PIL import Image

    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in sample:
            with Image.open(io.BytesIO(sample[ext])) as im:
                return im.convert("RGB")
    raise ValueError(f"no image member (have {sorted(k for k in sample if not k.startswith('__'))})")


def _words(s: str | None) -> int | None:
    return len(s.split()) if s is not None else None


def recaption_unit(url: str, backend: HFBackend, batch_size: int, provenance: dict[str, Any]) -> pa.Table:
    """Caption one shard; every sample becomes exactly one row (a caption, or status ``error`` and the reason)."""
    rows: list[dict[str, Any]] = []
    batch: list[tuple[dict[str, Any], Any]] = []
    errors: list[str] = []

    def base(sample: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        org = sample["txt"].decode("utf-8", "replace") if "txt" in sample else meta.get("caption")
        return {"url": meta.get("url"), "org_caption": org, "sha256": meta.get("sha256"), "key": sample["__key__"],
                "re_clip_score": None, "org_clip_score": None, "org_length": _words(org), "re_gpt4v_score": None,
                "org_gpt4v_score": None, **provenance}  # fmt: skip

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
        batch.clear()

    for sample in _samples(url, errors):
        try:
            row = base(sample)
        except Exception as exn:  # unreadable json member: still one row, keyed
            row = {"key": sample["__key__"], **provenance}
            row.update(status="error", error=f"metadata: {type(exn).__name__}: {exn}")
            rows.append(row)
            continue
        try:
            batch.append((row, _image(sample)))
        except Exception as exn:
            row.update(re_caption=None, re_length=None, n_generated_tokens=0, hit_token_limit=False, retried=False,
                       status="error", error=f"image: {type(exn).__name__}: {exn}")  # fmt: skip
            rows.append(row)
        if len(batch) >= batch_size:
            flush()
    flush()
    if errors:  # a damaged shard: the samples read before the damage are kept; the damage is recorded
        print(f"recaption: {url}: {'; '.join(errors)}", file=sys.stderr)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _append_manifest(out: Path, record: dict[str, Any]) -> None:
    with open(out / MANIFEST, "a") as f:  # one short O_APPEND write per finished unit
        f.write(json.dumps(record) + "\n")


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
) -> dict[str, Any]:
    from datamodules.shards import expand_urls

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_urls(shards)
    names = [unit_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"shard names must be unique (outputs are named after them): {sorted(names)[:5]}...")
    rank, world = rank_world(rank, world_size)
    mine = pending_units(urls, out, rank, world)
    backend = HFBackend(model, prompt, max_new_tokens, device, dtype)
    decoding = json.dumps({"strategy": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size})
    provenance = {"model": model, "model_hash": model_hash(model), "prompt": prompt, "decoding": decoding}
    totals = {"units": 0, "rows": 0, "errors": 0, "tokens": 0, "seconds": 0.0}
    for i, url in enumerate(mine):
        t0 = time.perf_counter()
        table = recaption_unit(url, backend, batch_size, provenance)
        path = out / f"{unit_name(url)}.parquet"
        if path.exists():  # another process finished it meanwhile (overlapping runs): keep the first, never both
            continue
        _write_atomic(table, path)
        dt = time.perf_counter() - t0
        n_err = sum(s != "ok" for s in table.column("status").to_pylist())
        tokens = sum(table.column("n_generated_tokens").to_pylist())
        record = {"unit": unit_name(url), "url": url, "rows": table.num_rows, "errors": n_err, "tokens": tokens}
        _append_manifest(out, record | {"seconds": round(dt, 3), "rank": rank, "world_size": world})
        totals = {k: totals[k] + v for k, v in zip(totals, (1, table.num_rows, n_err, tokens, dt), strict=True)}
        eta = totals["seconds"] / totals["units"] * (len(mine) - i - 1)
        print(f"recaption [{rank}/{world}] {i + 1}/{len(mine)} {unit_name(url)}: {table.num_rows} rows, "
              f"{table.num_rows / dt:.1f} img/s, {tokens / dt:.0f} tok/s, {n_err} errors/flagged, ETA {eta:.0f} s",
              flush=True)  # fmt: skip
    return totals


def merge(out: str | os.PathLike, dest: str | os.PathLike | None = None, shards: str | None = None) -> Path:
    """Concatenate the unit parquets into ``dest`` (default ``<out>/merged/recap.parquet``). Refuses duplicate keys,
    and with ``shards`` also missing units."""
    out = Path(out)
    files = sorted(p for p in out.glob("*.parquet") if not p.name.startswith((".", "_")))
    if shards is not None:
        from datamodules.shards import expand_urls

        missing = sorted({unit_name(u) for u in expand_urls(shards)} - {p.stem for p in files})
        if missing:
            raise ValueError(
                f"{len(missing)} shards have no output in {out} yet (rerun `recaption run`): {missing[:5]}"
            )
    table = pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in files]) if files else SCHEMA.empty_table()
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        from collections import Counter

        dup = [k for k, n in Counter(keys).items() if n > 1]
        raise ValueError(f"{len(dup)} keys occur more than once across {out}/*.parquet: {dup[:5]}")
    dest = Path(dest) if dest is not None else out / "merged" / "recap.parquet"
    dest.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(table, dest)
    return dest


RUN_KEYS = ("model", "shards", "out", "prompt", "max_new_tokens", "batch_size", "rank", "world_size", "device", "dtype")


def _load_config(path: str) -> dict[str, Any]:
    """A recaption YAML (``experiments/configs/recaption/*.yaml``): the ``run`` flags as keys (``-`` or ``_``)."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    cfg = {str(k).replace("-", "_"): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid: {list(RUN_KEYS)}")
    return cfg


def main(argv: Sequence[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(prog="python -m experiments recaption", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="caption the shards this process owns (resumable; any number of processes)")
    r.add_argument("--config", default=None, help="YAML with these flags as keys; flags given here override it")
    r.add_argument("--model", default=None, help="llava-hf folder (export-captioner output) or hub name")
    r.add_argument("--shards", default=None, help="shard paths: braces, globs, a directory or a '::' list")
    r.add_argument("--out", default=None)
    r.add_argument("--prompt", default=PAPER_PROMPT)
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--rank", type=int, default=None, help="default: $RANK / $SLURM_PROCID / 0")
    r.add_argument("--world-size", type=int, default=None, help="default: $WORLD_SIZE / $SLURM_NTASKS / 1")
    r.add_argument("--device", default=None)
    r.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float16", "float32"])
    m = sub.add_parser("merge", help="check every key occurs once and write the dataset-level parquet")
    m.add_argument("--out", required=True)
    m.add_argument("--dest", default=None)
    m.add_argument("--shards", default=None, help="also require an output for each of these shards")
    args = parser.parse_args(argv)
    if args.command == "merge":
        path = merge(args.out, args.dest, args.shards)
        print(f"merged -> {path}")
        return path
    if args.config:
        r.set_defaults(**_load_config(args.config))
        args = parser.parse_args(argv)  # flags on the command line win over the file
    missing = [k for k in ("model", "shards", "out") if getattr(args, k) is None]
    if missing:
        parser.error(f"recaption run needs {', '.join('--' + k for k in missing)} (flags or --config)")
    totals = run(**{k: getattr(args, k) for k in RUN_KEYS})
    print(f"recaption done: {json.dumps(totals)}")
    return totals
