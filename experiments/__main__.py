"""``python -m experiments <command>``: Lightning's fit/validate/test/predict plus the suite's own commands."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

# OpenMP threads that spin while waiting collapse when the CPU is shared (loader workers, a second job): a tiny-CLIP
# step measured 2.4 s instead of 0.6 s with 2 threads next to one other busy process. Sleeping waits cost little
# where the CPU is not the bottleneck. Must be set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LIGHTNING_COMMANDS = {
    "fit": "train a model (any LightningModule x DataModule pair from --config YAMLs)",
    "validate": "run the validation loop of a model on a DataModule",
    "test": "run the test/evaluation loop",
    "predict": "run the predict loop (e.g. recaptioning, sampling)",
}


def _module_main(module: str, function: str = "main") -> Callable[[Sequence[str]], None]:
    """A command that runs ``module.<function>(argv)``, importing the module only when the command runs."""

    def run(argv: Sequence[str]) -> None:
        import importlib

        getattr(importlib.import_module(module), function)(list(argv))

    return run


SUITE_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "world": (
        _module_main("experiments.world"),
        "generate the tiny world: web shards, captioner data and evaluation sets (CPU, seeded)",
    ),
    "sidecars": (
        _module_main("experiments.jobs.sidecars"),
        "join a Recap-DataComp-1B-schema parquet to image shards as per-shard sidecars",
    ),
    "truth-recaptions": (
        _module_main("datamodules.tiny_world.recaption"),
        "tiny world only: recaptions from ground truth (an imperfect oracle) in the Recap-DataComp-1B schema",
    ),
    "clip-table": (
        _module_main("experiments.run_table"),
        "train + evaluate the rows of a paper CLIP table (stage 1 + 2), write the table",
    ),
    "export-clip": (
        _module_main("experiments.export_clip"),
        "write a ClipModule checkpoint as an open_clip folder (config + safetensors)",
    ),
    "world-tokenizer": (
        _module_main("experiments.tiny_llm", "tokenizer_main"),
        "tiny world only: train the captioner's BPE tokenizer (LLaMA-3 special tokens and chat template)",
    ),
    "world-judge": (
        _module_main("lightning_modules.evaluation.judge"),
        "tiny world only: train the pinned attribute judge (GenEval-like accuracy and FID features for the DiT)",
    ),
    "tiny-llm": (
        _module_main("experiments.tiny_llm"),
        "tiny world only: text-pretrain the Llama that stands in for LLaMA-3",
    ),
    "caption-tune": (
        _module_main("datamodules.tiny_world.caption_tune"),
        "tiny world only: write the caption-tuning json (the paper's HQ-Edit step in miniature)",
    ),
    "recaption": (
        _module_main("experiments.jobs.recaption"),
        "recaption image shards with a llava-hf captioner (resumable, exactly once; `run`, then `merge`)",
    ),
    "export-captioner": (
        _module_main("experiments.export_captioner"),
        "write a CaptionerModule checkpoint as a llava-hf folder (LoRA merged; from_pretrained-ready)",
    ),
    "import-llava": (
        _module_main("experiments.import_llava"),
        "an original-LLaVA checkpoint (llava_llama, e.g. the paper's released captioner) as a llava-hf folder",
    ),
    "dit-cache": (
        _module_main("experiments.jobs.dit_cache"),
        "precompute the DiT's latents + text features of every caption source (resumable; same configs as fit)",
    ),
    "sweep": (
        _module_main("experiments.sweep"),
        "a W&B sweep spec's grid, locally or as an agent's command; a point runs its whole row (both stages, eval)",
    ),
    "dit-eval": (
        _module_main("experiments.dit_eval"),
        "sample a DiT checkpoint on prompt sets; FID, CLIP score, judge score, tiny-world attribute accuracy",
    ),
    "report": (
        _module_main("experiments.report"),
        "a paper table (table1..table8) with our runs beside it: Markdown, CSV, JSON, plots; table READMEs",
    ),
    "analyze": (
        _module_main("experiments.jobs.analyze"),
        "caption statistics of shards / recaption parquets: length histogram, vocabulary coverage, CLIP share",
    ),
    "reproduce": (
        _module_main("experiments.reproduce"),
        "the paper's whole chain in miniature on CPU (world -> captioner -> recaption -> CLIP, DiT -> report)",
    ),
}


def usage() -> str:
    lines = [
        "usage: python -m experiments <command> [options]    (python -m experiments <command> --help)",
        "",
        "Lightning commands (LightningCLI: --config A.yaml --config B.yaml, --print_config, dotted overrides;",
        "  --row TABLE/ROW [--stage N] [--scale tiny|paper]: a paper table row, experiments/paper_tables.py):",
        *[f"  {name:<17} {text}" for name, text in LIGHTNING_COMMANDS.items()],
        "",
        "Suite commands:",
        *[f"  {name:<17} {text}" for name, (_, text) in SUITE_COMMANDS.items()],
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command = argv[0]
    if command in SUITE_COMMANDS:
        SUITE_COMMANDS[command][0](argv[1:])
        return
    if command not in LIGHTNING_COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    from experiments.cli import cli_main

    cli_main(None if from_command_line else argv)  # LightningCLI reads sys.argv itself (and warns if given both)


if __name__ == "__main__":
    main()
