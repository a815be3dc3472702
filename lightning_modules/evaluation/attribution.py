"""VG-Attribution (ARO: Yuksekgonul et al., ICLR 2023; paper Table 6) as an evaluation task, read as ARO's
``dataset_zoo/aro_datasets.py`` reads its release (docs/clip.md, "VG-Attribution", gives the layout).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .tasks import EvalTask, PathLike, TextEncoder, _ImageList, _read_json, _require_dir, read_image_file

ANNOTATION_FILE = "visual_genome_attribution.json"
BOX_FIELDS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
CAPTION_FIELDS = ("true_caption", "false_caption")
ARO_MIN_PAIR_COUNT = 25  # evaluate_scores skips attribute pairs with fewer items


class _CroppedImages(_ImageList):
    """``(transform(image cropped to its box), index)``, cropped with PIL as ARO's ``__getitem__`` does."""

    def __init__(self, paths: list[Path], boxes: list[tuple[float, ...]], transform: Callable) -> None:
        super().__init__(paths, transform)
        self.boxes = boxes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y, w, h = self.boxes[index]
        image = read_image_file(self.paths[index], "VG-Attribution image").crop((x, y, x + w, y + h))
        return self.transform(image), index


class VGAttribution(EvalTask):
    """Per item, is the similarity of ``true_caption`` above that of ``false_caption`` (its two attributes swapped)?
    A tie counts as wrong, as ARO's ``argmax([sim(false), sim(true)])`` does. ``accuracy`` (percent) is the number ARO
    and the paper report: the mean over attribute pairs (``f"{attributes[0]}_{attributes[1]}"``) with at least
    ``min_pair_count`` items (ARO: 25) of each pair's accuracy; ``micro_accuracy`` is over all items."""

    def __init__(self, root: PathLike, name: str = "vg_attribution", min_pair_count: int = ARO_MIN_PAIR_COUNT):
        root = Path(root)
        source = root / ANNOTATION_FILE
        image_dir = _require_dir(root / "images", "VG-Attribution image folder")
        items = _read_json(source, "VG-Attribution annotation file")
        if not isinstance(items, list) or not items:
            raise ValueError(f"{source}: expected a non-empty list of items")
        self.name, self.paths, self.boxes = name, [], []
        self.true_texts, self.false_texts = [], []
        by_pair: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            where = f"{source}: item {i}"
            if not isinstance(item, dict):
                raise ValueError(f"{where} is not an object")
            missing = [f for f in ("image_path", *BOX_FIELDS, *CAPTION_FIELDS, "attributes") if f not in item]
            if missing:
                raise ValueError(f"{where} lacks field {missing[0]!r}")
            box = tuple(item[f] for f in BOX_FIELDS)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box) or min(box[2:]) <= 0:
                raise ValueError(f"{where}: bbox_x/y/w/h must be numbers with bbox_w, bbox_h > 0, got {box}")
            for f in ("image_path", *CAPTION_FIELDS):
                if not isinstance(item[f], str) or not item[f].strip():
                    raise ValueError(f"{where}: field {f!r} is empty or not a string")
            attributes = item["attributes"]
            if not isinstance(attributes, list) or len(attributes) < 2:
                raise ValueError(f"{where}: field 'attributes' must list the two swapped attributes")
            self.paths.append(image_dir / item["image_path"])
            self.boxes.append(box)
            self.true_texts.append(item["true_caption"])
            self.false_texts.append(item["false_caption"])
            by_pair[f"{attributes[0]}_{attributes[1]}"].append(i)
        self.pair_items = {p: idx for p, idx in sorted(by_pair.items()) if len(idx) >= min_pair_count}
        if not self.pair_items:
            most = max(len(idx) for idx in by_pair.values())
            raise ValueError(
                f"{source}: no attribute pair has min_pair_count={min_pair_count} items (the largest has {most})"
            )

    def image_dataset(self, transform: Callable[[Image.Image], torch.Tensor]) -> Dataset:
        super().image_dataset(transform)  # every image file must exist
        return _CroppedImages(self.paths, self.boxes, transform)

    def compute(
        self, image_features: torch.Tensor, encode_texts: TextEncoder, tokenizer: Any, context_length: int
    ) -> dict[str, float]:
        n = len(self.paths)
        self._check_features(image_features, n)
        texts = self.true_texts + self.false_texts
        over = self._count_over_context(texts, tokenizer, context_length)
        text_features = F.normalize(encode_texts(texts).float(), dim=-1).to(image_features.device)
        image_features = image_features.float()
        true_sim = (image_features * text_features[:n]).sum(-1)
        false_sim = (image_features * text_features[n:]).sum(-1)
        correct = (true_sim > false_sim).float().cpu()
        per_pair = [correct[idx].mean() for idx in self.pair_items.values()]
        return {
            "accuracy": 100.0 * float(torch.stack(per_pair).mean()),
            "micro_accuracy": 100.0 * float(correct.mean()),
            "n_pairs": float(len(per_pair)),
            "n_items": float(n),
        } | over
