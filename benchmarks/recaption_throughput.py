"""Recaptioning throughput: the recaption job's batched greedy decoding against per-image ``generate`` (batch 1, the
way LLaVA's own loader runs), on the same llava-hf model and the same images, with the same prompt and token limit.

    python -m benchmarks.recaption_throughput --model runs/tiny/captioner/hf \
        --images 'data/world/eval/t2i_prompts/images/*.jpg'

Prints the medians over alternating rounds of both images/s and generated tokens/s, their ratio (goal >= 10x) and how
many captions agree (greedy: batched and one-by-one must, up to padding numerics). Figures: ``docs/recaption.md``.
"""

from __future__ import annotations

import glob
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.common import parser, sync, write_json


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser("recaption_throughput", __doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True, help="glob of image files")
    p.add_argument("--n", type=int, default=256, help="images timed with the batched job")
    p.add_argument("--n-single", type=int, default=32, help="images timed one by one (slow)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (job, batch 1); medians reported")
    args = p.parse_args(argv)
    from PIL import Image

    from experiments.jobs.recaption import PAPER_PROMPT, HFBackend

    files = sorted(glob.glob(args.images))[: max(args.n, args.n_single)]
    if not files:
        raise FileNotFoundError(f"no images match {args.images}")
    images = [Image.open(f).convert("RGB") for f in files]
    backend = HFBackend(args.model, PAPER_PROMPT, args.max_new_tokens, args.device, args.dtype)
    backend.generate(images[:2])  # warm-up

    def timed(batch: int, subset: list) -> tuple[float, float, list]:
        """Images/s and generated tokens/s of captioning ``subset`` ``batch`` images at a time, and the captions."""
        t0 = time.perf_counter()
        out = [g for i in range(0, len(subset), batch) for g in backend.generate(subset[i : i + batch])]
        if backend.device.startswith("cuda"):  # a --device cpu run on a GPU machine must not start CUDA here
            sync()
        dt = time.perf_counter() - t0
        return len(out) / dt, sum(g.n_tokens for g in out) / dt, out

    # alternating rounds: (job images/s, job tokens/s, job captions, batch-1 images/s, batch-1 tokens/s, captions)
    rounds = [
        (*timed(args.batch_size, images[: args.n]), *timed(1, images[: args.n_single]))
        for _ in range(max(1, args.repeats))
    ]
    job_ips, job_tps, batched, one_ips, one_tps, single = zip(*rounds, strict=True)
    same = sum(a.text == b.text for a, b in zip(batched[-1], single[-1], strict=False))
    report = {"device": backend.device, "batch_size": args.batch_size, "repeats": len(rounds)}
    report |= {"job_images_per_s": statistics.median(job_ips), "job_tokens_per_s": statistics.median(job_tps)}
    report |= {"batch1_images_per_s": statistics.median(one_ips), "batch1_tokens_per_s": statistics.median(one_tps)}
    report["round_ratios"] = [round(a / b, 2) for a, b in zip(job_ips, one_ips, strict=True)]
    report["captions_equal"] = f"{same}/{len(single[-1])}"
    report["ratio_images_per_s"] = report["job_images_per_s"] / report["batch1_images_per_s"]
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in report.items()}))
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
