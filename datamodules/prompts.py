"""Prompt sets (a Recap-COCO-30K-schema parquet: ``image_id, coco_url, caption, recaption``): ``read_prompt_set``,
and ``PromptDataModule``, their batches for ``predict`` (DiT sampling).

    python -m experiments predict --config experiments/configs/tiny/dit/base.yaml \
        --config experiments/configs/tiny/dit/sample.yaml \
        --ckpt_path runs/tiny/dit/table7/p0.0/fit/checkpoints/last.ckpt
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import lightning as L
from torch.utils.data import DataLoader

from datamodules.checks import RunContext, check_path

log = logging.getLogger(__name__)
PathLike = str | os.PathLike


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: ``image_id``, the prompt text, its reference image (``None`` when unknown) and the parquet row
    (every non-binary column, e.g. ``coco_url``, the other caption column, the tiny world's ``objects``)."""

    image_id: Any
    prompt: str
    image_path: Path | None
    row: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class PromptSet(list[PromptRecord]):
    """The records ``read_prompt_set`` kept, with their file, column, rows in the file and rows with no prompt."""

    def __init__(self, records: list[PromptRecord], path: Path, column: str, n_rows: int, n_empty: int) -> None:
        super().__init__(records)
        self.path, self.column, self.n_rows, self.n_empty = path, column, n_rows, n_empty


def seeded_subset(n: int, k: int | None, seed: int = 0) -> list[int]:
    """``k`` indices of ``range(n)`` drawn with ``random.Random(seed)``, sorted; all when ``k`` is None or ``>= n``."""
    if k is None or k >= n:
        return list(range(n))
    if k < 1:
        raise ValueError(f"subset size must be >= 1, got {k}")
    return sorted(random.Random(seed).sample(range(n), k))


def _is_binary(dtype: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(dtype):  # e.g. an HF ``Image`` feature: {bytes, path}
        return any(_is_binary(f.type) for f in dtype)
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_fixed_size_binary(dtype)


def _coco_image_path(url: str, image_id: Any, image_root: Path) -> Path:
    """A COCO image under ``image_root``: the url's file name (``COCO_val2014_000000xxxxxx.jpg``, also under
    ``val2014/``), else ``<image_id>.jpg`` or ``<12-digit image_id>.jpg``; the url name when none exists."""
    name = PurePosixPath(urlparse(url).path).name
    candidates = [image_root / name, image_root / "val2014" / name, image_root / f"{image_id}.jpg"]
    if str(image_id).isdigit():
        candidates.append(image_root / f"{int(image_id):012d}.jpg")
    return next((p for p in candidates if p.is_file()), candidates[0])


def read_prompt_set(
    path: PathLike,
    column: str = "caption",
    image_root: PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> PromptSet:
    """Prompts from a parquet in the Recap-COCO-30K schema (``image_id, coco_url, caption, recaption``).

    Other non-binary columns are kept in ``PromptRecord.row``. Blank prompts are skipped and counted (``n_empty``).
    ``limit`` keeps a seeded subset in file order (the paper rates 3k of the 30k with GPT-4V). Reference images:
    ``file_name`` (the tiny world) is relative to ``image_root`` or the parquet's folder; else ``coco_url``'s file name
    is looked up under ``image_root``; else ``image_path`` is None.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set not found: {path}")
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file; re-raised with the path
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    for required in ("image_id", column):
        if required not in schema.names:
            raise ValueError(f"{path}: missing required column {required!r} (columns: {schema.names})")
    if _is_binary(schema.field(column).type):
        raise ValueError(f"{path}: column {column!r} holds binary data, not prompt text")
    columns = [f.name for f in schema if not _is_binary(f.type)]
    try:
        rows = pq.read_table(path, columns=columns).to_pylist()
    except Exception as e:  # noqa: BLE001 - a damaged page or invalid UTF-8 in a string column; re-raised with the path
        raise ValueError(f"{path}: cannot read the rows ({type(e).__name__}: {e})") from e

    root = Path(image_root) if image_root is not None else None
    records: list[PromptRecord] = []
    n_empty = 0
    for row in rows:
        prompt = row[column]
        if prompt is None or not str(prompt).strip():
            n_empty += 1
            continue
        image_path: Path | None = None
        if row.get("file_name"):
            image_path = (root or path.parent) / row["file_name"]
        elif row.get("coco_url") and root is not None:
            image_path = _coco_image_path(row["coco_url"], row["image_id"], root)
        records.append(PromptRecord(row["image_id"], str(prompt).strip(), image_path, row))
    if n_empty:
        log.warning("%s: skipped %d of %d rows with an empty %r", path, n_empty, len(rows), column)
    if not records:
        raise ValueError(f"{path}: no non-empty prompts in column {column!r}")
    if limit is not None:
        records = [records[i] for i in seeded_subset(len(records), limit, seed)]
    return PromptSet(records, path, column, len(rows), n_empty)


def _collate(records: list[Any]) -> dict[str, list]:
    return {"prompt": [r.prompt for r in records], "image_id": [r.image_id for r in records]}


class PromptDataModule(L.LightningDataModule):
    """Batches of ``{"prompt", "image_id"}`` for ``DiTModule.predict_step``: the ``column`` (``caption`` or
    ``recaption``) of a Recap-COCO-30K-schema parquet, ``batch_size`` per PNG grid, a seeded subset of ``limit``."""

    def __init__(
        self, prompts: str, column: str = "caption", batch_size: int = 64, limit: int | None = None, seed: int = 0
    ):
        super().__init__()
        self.save_hyperparameters()

    @classmethod
    def validate_config(cls, args: dict[str, Any], run: RunContext) -> None:
        check_path("prompts", args.get("prompts"), "file", what="a prompt parquet (Recap-COCO-30K schema)")

    def predict_dataloader(self) -> DataLoader:
        h = self.hparams
        records = list(read_prompt_set(h.prompts, h.column, limit=h.limit, seed=h.seed))
        return DataLoader(records, batch_size=h.batch_size, shuffle=False, collate_fn=_collate)
