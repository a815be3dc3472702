"""Long-caption retrieval on DCI, DOCCI, IIW and ShareGPT4V-1k/10k as their owners release them (FLAIR, CVPR 2025,
and Long-CLIP evaluate on these beside Urban-1K, ``tasks.LongRetrieval``); docs/clip.md gives the layouts and sources.

One long caption per image, kept whole: ``_RetrievalTask`` counts (and warns about) those longer than the text
context, which the text tower encodes truncated, as FLAIR and Long-CLIP do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .tasks import PathLike, _read_json, _require_dir, _RetrievalTask


def _read_jsonl(path: Path, what: str) -> list[tuple[str, dict]]:
    """``(where, record)`` per non-empty line; ``where`` is ``"<file>:<line>"`` for error messages."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object")
            records.append((f"{path}:{n}", record))
    return records


def _text(record: Any, key: str, where: str) -> str:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} is missing, empty or not a string")
    return value.strip()


class DCIRetrieval(_RetrievalTask):
    """DCI (``root`` = ``densely_captioned_images/``): the long caption is ``short_caption + "\\n" + extra_caption``, as
    DCI's ``get_extended_caption`` and FLAIR's ``read_dci_pairs`` build it; FLAIR's default of all splits in file
    order (7,599 + 98 + 108 = 7,805 images)."""

    def __init__(self, root: PathLike, splits: Sequence[str] = ("train", "valid", "test"), name: str = "dci") -> None:
        root = _require_dir(Path(root), "DCI folder (densely_captioned_images)")
        split_file = root / "splits.json"
        table = _read_json(split_file, "DCI split file")
        pairs = []
        for split in splits:
            files = table.get(split) if isinstance(table, dict) else None
            if not isinstance(files, list):
                raise ValueError(f"{split_file}: no list for split {split!r}")
            for file in files:
                path = root / "annotations" / str(file)
                anno = _read_json(path, f"DCI annotation (listed in {split_file} under {split!r})")
                image = _text(anno, "image", str(path))
                caption = f"{_text(anno, 'short_caption', str(path))}\n{_text(anno, 'extra_caption', str(path))}"
                pairs.append((root / "photos" / image, [caption]))
        super().__init__(name, pairs, split_file)


class DOCCIRetrieval(_RetrievalTask):
    """DOCCI: ``root/docci_descriptions.jsonlines`` and ``root/images/``; every record of ``split`` is one image and
    its ``description`` (test: DOCCI's 5,000 held-out images)."""

    def __init__(self, root: PathLike, split: str = "test", name: str = "docci") -> None:
        root = _require_dir(Path(root), "DOCCI folder")
        source = root / "docci_descriptions.jsonlines"
        pairs, splits = [], set()
        for where, record in _read_jsonl(source, "DOCCI descriptions file"):
            splits.add(_text(record, "split", where))
            if record["split"] == split:
                image = root / "images" / _text(record, "image_file", where)
                pairs.append((image, [_text(record, "description", where)]))
        if not pairs:
            raise ValueError(f"{source}: no records in split {split!r} (splits present: {sorted(splits)})")
        super().__init__(name, pairs, source)


IIW_SUBSETS = {"DOCCI_Test": "docci", "IIW-400": "docci_aar", "DCI_Test": "dci"}


class IIWRetrieval(_RetrievalTask):
    """ImageInWords: ``root/<subset>/data.jsonl`` per subset, its images in ``root/<subsets[subset]>`` (FLAIR's
    layout). The image is ``image`` or ``image/key`` (IIW-400), ``.jpg`` appended when it has no suffix; the caption
    is ``field``: ``IIW`` (human-authored; FLAIR's choice) or ``IIW-P5B`` (PaLI-5B's, IIW-400 only)."""

    def __init__(
        self, root: PathLike, subsets: Mapping[str, str] = IIW_SUBSETS, field: str = "IIW", name: str = "iiw"
    ) -> None:
        root = _require_dir(Path(root), "IIW folder")
        pairs = []
        for subset, image_dir in subsets.items():
            for where, record in _read_jsonl(root / subset / "data.jsonl", f"IIW {subset} file"):
                key = "image" if "image" in record else "image/key"
                image = _text(record, key, where)
                image += "" if Path(image).suffix else ".jpg"
                pairs.append((root / image_dir / image, [_text(record, field, where)]))
        super().__init__(name, pairs, root)


class ShareGPT4VRetrieval(_RetrievalTask):
    """ShareGPT4V-1k/10k: the first ``n`` items of ``share-captioner_coco_lcs_sam_1246k_1107.json``, as Long-CLIP
    and FLAIR take them; the caption is ``conversations[1]["value"]`` (the ``gpt`` turn), the image ``image_root /
    image``."""

    def __init__(self, json_file: PathLike, image_root: PathLike, n: int = 1000, name: str = "sharegpt4v_1k") -> None:
        source, image_root = Path(json_file), Path(image_root)
        items = _read_json(source, "ShareGPT4V caption file")
        if not isinstance(items, list) or len(items) < n:
            size = len(items) if isinstance(items, list) else type(items).__name__
            raise ValueError(f"{source}: expected a list of at least n={n} items, got {size}")
        pairs = []
        for i, item in enumerate(items[:n]):
            where = f"{source}: item {i}"
            turns = item.get("conversations") if isinstance(item, dict) else None
            if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[1], dict):
                raise ValueError(f"{where}: field 'conversations' needs a [human, gpt] pair of turns")
            if turns[1].get("from") != "gpt":
                raise ValueError(f"{where}: conversations[1]['from'] is {turns[1].get('from')!r}, expected 'gpt'")
            caption = _text(turns[1], "value", f"{where} conversations[1]")
            pairs.append((image_root / _text(item, "image", where), [caption]))
        super().__init__(name, pairs, source)
