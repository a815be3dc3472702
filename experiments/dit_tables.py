"""Paper Table 7 (Recap-DiT-B/4 at eight mix ratios p, COCO-30K evaluation) and the DiT-L/2 run as data. A row is its
p (and, for L/2, its size) over ``experiments/configs/[tiny/]dit/base.yaml``; ``experiments.paper_tables.row_args``
composes it (``python -m experiments fit --row table7/p0.5 [--scale paper]``)."""

from __future__ import annotations

from dataclasses import dataclass

# Table 7 (PAPER.md §1): raw COCO prompts (FID, CLIP) and COCO-Recap prompts (FID, CLIP, Recap-CLIP, GPT-4V).
COLUMNS = ("raw_fid", "raw_clip", "recap_fid", "recap_clip", "recap_recap_clip", "recap_gpt4v")


@dataclass(frozen=True)
class DiTRow:
    id: str
    p: float
    paper: dict[str, float]
    size: str = "DiT-B/4"
    note: str = ""


TABLE7 = [
    DiTRow(f"p{p}", p, dict(zip(COLUMNS, nums, strict=True)))
    for p, nums in [
        (0.0, (37.6, 29.2, 27.8, 32.5, 28.3, 2.53)),
        (0.05, (38.5, 29.1, 27.9, 32.5, 28.0, 2.51)),
        (0.1, (36.0, 29.7, 27.2, 32.7, 28.2, 2.51)),
        (0.15, (35.8, 29.9, 28.2, 33.0, 28.1, 2.45)),
        (0.2, (35.8, 29.8, 28.4, 32.7, 28.0, 2.53)),
        (0.5, (35.3, 29.3, 30.2, 31.9, 26.7, 2.13)),
        (0.75, (31.3, 29.4, 32.7, 31.2, 25.8, 1.89)),
        (1.0, (32.5, 28.9, 36.2, 29.3, 19.9, 1.40)),
    ]
]
# Paper scale only (no tiny-world row).
L2 = DiTRow(
    "l2_p0.0",
    0.0,
    {"fid": 25.14, "clip": 34.82},
    size="DiT-L/2",
    note="§6 text, not in a table: 1 epoch, other parameters as B/4; prompt set not stated (likely COCO-Recap)",
)
