"""``python -m experiments export-captioner --ckpt RUN/checkpoints/last.ckpt --out DIR``: a llava-hf folder.

The checkpoint is read with ``weights_only=True``; the model is rebuilt from its hyperparameters (the same vision
tower, LLM and tokenizer sources), its trained weights are loaded, LoRA adapters are merged into the LLM, and
``save_pretrained`` writes model + processor (image processor, tokenizer, chat template). Then

    model = LlavaForConditionalGeneration.from_pretrained(DIR); processor = AutoProcessor.from_pretrained(DIR)

and vLLM / SGLang load ``DIR`` as any llava-hf model; ``model: {pretrained: DIR}`` continues training from it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path


def export_captioner(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    from lightning_modules.captioner import CaptionerModule

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} does not exist")
    module = CaptionerModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    return module.export_pretrained(out, in_place=True)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m experiments export-captioner", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ckpt", required=True, help="CaptionerModule Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="output folder (llava-hf layout)")
    args = parser.parse_args(argv)
    out = export_captioner(args.ckpt, args.out)
    print(f"exported {args.ckpt} -> {out} (LlavaForConditionalGeneration.from_pretrained('{out}'))")
    return out
