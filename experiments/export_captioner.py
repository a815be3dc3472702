"""``python -m experiments export-captioner --ckpt RUN/checkpoints/last.ckpt --out DIR``: a llava-hf folder.

The checkpoint is read with ``weights_only=True`` (a pickled object is refused as unsafe, exit code 1), the model
rebuilt from its hyperparameters with LoRA adapters merged; transformers, vLLM and SGLang load ``DIR``, and
``model: {pretrained: DIR}`` continues training from it. A checkpoint that lacks frozen weights drawn at random (a
config-dict tower) is refused, naming them, rather than exported with new random ones.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def export_captioner(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    from lightning_modules.captioner import CaptionerModule
    from lightning_modules.components.clip_model import load_checkpoint_file

    ckpt = Path(ckpt)
    contents = load_checkpoint_file(ckpt)  # weights_only=True; an unsafe file is refused with its path
    module = CaptionerModule.from_checkpoint_contents(contents, ckpt)
    del contents
    return module.export_pretrained(out, in_place=True, source=str(ckpt))


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m experiments export-captioner", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ckpt", required=True, help="CaptionerModule Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="output folder (llava-hf layout)")
    args = parser.parse_args(argv)
    try:
        out = export_captioner(args.ckpt, args.out)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"export-captioner: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"exported {args.ckpt} -> {out} (LlavaForConditionalGeneration.from_pretrained('{out}'))")
    return out
