"""``CaptionAttributes``: caption held-out tiny-world images and score the captions against the ground truth
(``caption_attributes.score_captions``), beside the same captions scored against another image's truth (chance)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .caption_attributes import chance_scores, parse_caption, score_captions


class CaptionAttributes:
    """The world's ``eval/t2i_prompts/prompts.parquet`` (``file_name`` relative to ``image_root``, default the
    parquet's folder; ``objects``, ``background``): its first ``limit`` images (generation dominates the cost) are
    captioned and scored, metrics under ``eval/<name>/``, the first ``examples`` kept in ``last_examples``."""

    def __init__(
        self,
        prompts_parquet: str,
        image_root: str | None = None,
        limit: int | None = 300,
        name: str = "caption_attributes",
        examples: int = 5,
    ):
        self.prompts_parquet, self.limit, self.name, self.examples = prompts_parquet, limit, name, examples
        self.image_root = Path(image_root) if image_root else Path(prompts_parquet).parent
        self.last_examples: list[dict[str, str]] = []

    def _rows(self) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        path = Path(self.prompts_parquet)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (the tiny world's eval/t2i_prompts; make world)")
        cols = ["file_name", "objects", "background", "recaption"]
        rows = pq.read_table(path, columns=cols).to_pylist()
        return rows[: self.limit] if self.limit else rows

    def run(self, caption_fn: Callable[..., list[str]], batch_size: int = 64) -> dict[str, float]:
        rows = self._rows()
        images = []
        for r in rows:
            with Image.open(self.image_root / r["file_name"]) as im:
                images.append(im.convert("RGB"))
        captions = caption_fn(images, batch_size=batch_size)
        return self.score(captions, rows)

    def score(self, captions: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        parsed = [parse_caption(c) for c in captions]
        truths = [r["objects"] for r in rows]
        backgrounds = [r["background"] for r in rows]
        out = score_captions(parsed, truths, backgrounds)
        if len(rows) >= 2:
            chance = chance_scores(parsed, truths, seed=0, backgrounds=backgrounds)
            out |= {f"chance_{k}": v for k, v in chance.items() if not k.startswith("n")}
        out["mean_words"] = sum(len(c.split()) for c in captions) / max(1, len(captions))
        self.last_examples = [
            {"caption": c, "truth": r["recaption"], "objects": json.loads(r["objects"])}
            for c, r in zip(captions[: self.examples], rows, strict=False)
        ]
        return out
