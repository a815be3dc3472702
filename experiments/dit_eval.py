"""``python -m experiments dit-eval``: sample a trained Recap-DiT on prompt sets and score the images (Table 7).

Per prompt column (``caption``: raw COCO-style prompts; ``recaption``: COCO-Recap) one image per prompt (EMA weights),
a grid of the first 64 and ``<out>/<column>/metrics.json``: ``fid`` (InceptionV3, or the tiny world judge's features),
``clip_score/<name>`` per ``--clip NAME=FOLDER``, ``judge/*`` (the paper's GPT-4V rating prompt, ``--llava-judge``)
and in the tiny world ``attributes/*`` (the pinned judge's accuracy on what each prompt states, ``attributes/chance/*``
against deranged prompts). ``<out>/results.md`` puts both columns side by side.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def stated_truth(record: Any) -> dict[str, Any]:
    """The main object's attributes that the prompt states (a short prompt may leave colour or position out, and
    only what a prompt asks for can be judged), from the record's ground truth (``objects``/``background``)."""
    from lightning_modules.evaluation.caption_attributes import parse_caption

    row = record.row
    objects = json.loads(row["objects"]) if isinstance(row["objects"], str) else row["objects"]
    main = objects[0]
    parsed = parse_caption(record.prompt)
    match = next((o for o in parsed.objects if o.shape == main["shape"] and o.colour in (None, main["colour"])), None)
    out: dict[str, Any] = {}
    if match is not None:
        out["shape"] = main["shape"]
        if match.colour is not None:
            out["colour"] = main["colour"]
        if match.position is not None:
            out["position"] = main["position"]
    if parsed.count is not None:
        out["count"] = len(objects)
    bg = row.get("background")
    if parsed.background is not None and parsed.background.kind not in (None, "stripes") and bg is not None:
        out["background"] = (json.loads(bg) if isinstance(bg, str) else bg)["kind"]
    return out


def _scorers(specs: Sequence[str]) -> dict[str, Any]:
    from lightning_modules.evaluation.generation import HFClipScorer, OpenClipScorer

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"--clip wants NAME=FOLDER, got {spec!r}")
        is_open_clip = (Path(path) / "open_clip_config.json").exists()
        out[name] = OpenClipScorer(path) if is_open_clip else HFClipScorer(path)
    return out


def evaluate(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from datamodules.prompts import read_prompt_set
    from lightning_modules.components.dit import save_grid
    from lightning_modules.dit import DiTModule
    from lightning_modules.evaluation.generation import FID, LlavaJudge, evaluate_generation

    module = DiTModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True)
    module.configure_model()
    module.eval()
    judge = fid = attribute_judge = None
    if args.attribute_judge:
        from lightning_modules.evaluation.judge import JudgeFeatures, judge_accuracy, load_judge

        pinned = load_judge(args.attribute_judge)

        def attribute_judge(images: torch.Tensor, records: Sequence[Any]) -> dict[str, float]:
            return judge_accuracy(pinned, images, [stated_truth(r) for r in records], seed=args.seed)

        fid = FID(JudgeFeatures(pinned))
    if args.inception_weights:
        fid = FID(2048, inception_weights=args.inception_weights)
    if args.llava_judge:
        judge = LlavaJudge(args.llava_judge)
    scorers = _scorers(args.clip)
    out = Path(args.out)
    results: dict[str, dict[str, float]] = {}
    sampling = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "sampler": args.sampler}
    for column in args.columns:
        records = read_prompt_set(args.prompts, column, image_root=args.image_root, limit=args.limit, seed=args.seed)
        images = []
        for i in range(0, len(records), args.batch_size):
            prompts = [r.prompt for r in records[i : i + args.batch_size]]
            images.append(module.generate(prompts, seed=args.seed + i, **sampling))
            print(f"dit-eval {column}: {min(i + args.batch_size, len(records))}/{len(records)} images", flush=True)
        images = torch.cat(images)
        save_grid(images[:64], out / column / "grid.png", nrow=8, captions=[r.prompt for r in records[:64]])
        hp = module.hparams
        run = {"checkpoint": str(args.ckpt), "sampler": args.sampler or hp.sampler}
        run |= {"steps": args.steps or hp.num_inference_steps}
        run |= {"guidance_scale": hp.guidance_scale if args.guidance is None else args.guidance}
        kwargs = {"fid": fid, "clip_scorers": scorers, "judge": judge, "judge_limit": args.judge_limit}
        kwargs |= {"reference_images": "records" if fid is not None else None, "attribute_judge": attribute_judge}
        results[column] = evaluate_generation(images, records, out / column / "metrics.json", **kwargs, extra=run)
    _write_table(results, out / "results.md", args)
    return results


def _write_table(results: dict[str, dict[str, float]], path: Path, args: argparse.Namespace) -> None:
    from experiments.tables import markdown

    lines = [f"# DiT evaluation: {args.ckpt}", "", f"prompts: {args.prompts} (limit {args.limit})", ""]
    cell = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    keys = sorted({k for m in results.values() for k in m})
    lines.append(markdown([[k, *(cell(results[c].get(k)) for c in results)] for k in keys], ["metric", *results]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m experiments dit-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompts", required=True, help="parquet in the Recap-COCO-30K schema")
    p.add_argument("--columns", nargs="+", default=["caption", "recaption"])
    p.add_argument("--image-root", default=None, help="reference images (COCO val2014) for FID")
    p.add_argument("--limit", type=int, default=None, help="a seeded subset of the prompts")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sampler", default=None, choices=[None, "ddpm", "ddim", "dpm"])
    p.add_argument("--attribute-judge", default=None, help="tiny world: the pinned judge folder (world-judge)")
    p.add_argument("--inception-weights", default=None, help="InceptionV3 FID weights file (real runs)")
    p.add_argument("--clip", action="append", default=[], help="NAME=FOLDER, repeatable")
    p.add_argument("--llava-judge", default=None, help="llava-hf folder answering the paper's rating prompt")
    p.add_argument("--judge-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return evaluate(p.parse_args(argv))
