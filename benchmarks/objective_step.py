"""Training-step time of each issue-19 objective beside plain ``ClipLoss``, in one run: ``ClipModule`` on the tiny
Recap-CLIP under a Lightning ``Trainer`` (forward + backward + AdamW), the same seeded weights and pre-built batches
for every objective. What each objective is and the figures: ``benchmarks/README.md``.

    python -m benchmarks.objective_step                  # batch 16, 12 steps/run (3 skipped), 2 rounds, 1 thread
    python -m benchmarks.objective_step --steps 40 --repeats 3 --record
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from benchmarks.clip_step import BETAS, LR, TINY_CLIP, WEIGHT_DECAY, make_batches
from benchmarks.common import ROOT, commit, free_memory, loadavg, parser, quiet, record, timed_fit, write_json

HISTORY = ROOT / "benchmarks" / "history" / "objective_step.jsonl"
VIEWS = {"text_views": {"original": 1.0, "recaption": 1.0}}
# a decoder of the text tower's size (w64, 2 heads), one layer: CLIPS's is a fraction of its text encoder
DECODER = {"weight": 1.0, "target": "recaption", "prefix": "original", "layers": 1, "width": 64, "heads": 2}
OBJECTIVES: dict[str, dict[str, Any]] = {
    "clip": {},
    "siglip": {"loss": "siglip", "init_logit_scale": math.log(10), "init_logit_bias": -10.0},
    "views2": VIEWS,
    "views2+decoder": {**VIEWS, "caption_decoder": DECODER},
    # the tiny world's setting: the decoder predicts the ~320 token ids of the texts the world's captioner learned
    # from, plus "other" (caption_decoder.vocab); here 320 words of open_clip's vocabulary stand in for them
    "views2+decoder_sl": {**VIEWS, "caption_decoder": {**DECODER, "vocab": "<shortlist>"}},
}
SHORTLIST_WORDS = 320


def batches(batch_size: int, n: int, seed: int) -> list[dict[str, Any]]:
    """``{"image", "text", "texts": {original, recaption}}``: the caption-mix layout with two views."""
    pairs = zip(
        make_batches(TINY_CLIP, batch_size, n, seed), make_batches(TINY_CLIP, batch_size, n, seed + 1), strict=True
    )
    return [{"image": i, "text": t, "texts": {"original": t, "recaption": r}} for (i, t), (_, r) in pairs]


def run_one(objective: str, state: dict[str, torch.Tensor], data: list, steps: int, skip: int) -> float:
    from lightning_modules.clip import ClipModule

    torch.manual_seed(0)  # the decoder's initial weights
    kw = json.loads(json.dumps(OBJECTIVES[objective]))
    if kw.get("caption_decoder", {}).get("vocab") == "<shortlist>":
        kw["caption_decoder"]["vocab"] = str(shortlist_file())
    module = ClipModule(model=TINY_CLIP, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, **kw)
    module.model.load_state_dict(state, strict=False)  # SigLIP adds a logit_bias the shared state lacks
    stamps = timed_fit(module, data, steps, start=True, accelerator="cpu", precision="32-true")
    del module
    free_memory()
    return 1e3 * stamps.seconds_per_step(skip)


def shortlist_file() -> Path:
    """A text file of ``SHORTLIST_WORDS`` whole words of open_clip's vocabulary (made once per process)."""
    path = Path(tempfile.gettempdir()) / f"objective_step_shortlist_{os.getpid()}.txt"
    if not path.exists():
        import open_clip

        vocab = open_clip.tokenizer.SimpleTokenizer().decoder.values()
        words = [w.removesuffix("</w>") for w in vocab if w.endswith("</w>")]
        path.write_text(" ".join(words[1000 : 1000 + SHORTLIST_WORDS]))
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser("objective_step", __doc__)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", nargs="?", const=str(HISTORY), metavar="FILE", help="append the run to the history")
    a = p.parse_args(argv)
    with quiet(a.threads):
        report = run(a)
    write_json(a.json, report)
    record(a.record, report)
    return report


def run(a: argparse.Namespace) -> dict[str, Any]:
    import open_clip

    torch.manual_seed(a.seed)
    state = open_clip.CLIP(**TINY_CLIP, output_dict=True).state_dict()
    data = batches(a.batch_size, 4, a.seed)
    t0 = time.perf_counter()
    times: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    for r in range(a.repeats):  # alternate the order so that drift in the machine's load hits every objective
        for name in OBJECTIVES if r % 2 == 0 else reversed(OBJECTIVES):
            times[name].append(run_one(name, state, data, a.steps, a.skip_steps))
    ref = statistics.median(times["clip"])
    rows = {
        name: {"ms_per_step": statistics.median(t), "min": min(t), "max": max(t), "ratio": statistics.median(t) / ref}
        for name, t in times.items()
    }
    table = pd.DataFrame(rows).T.rename(columns={"ms_per_step": "ms/step (median)", "ratio": "x ClipLoss"})
    print(table.rename_axis("objective").to_markdown(floatfmt=("", ".1f", ".1f", ".1f", ".2f")), flush=True)
    load = " ".join(f"{x:.2f}" for x in loadavg() or ()) or "?"
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": commit(),
        "settings": {k: v for k, v in vars(a).items() if k not in ("json", "record")},
        "objectives": OBJECTIVES,
        "results": {name: {k: round(v, 3) for k, v in row.items()} for name, row in rows.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, load {load}",
    }


if __name__ == "__main__":
    main()
