"""``python -m experiments export-clip --ckpt RUN/checkpoints/last.ckpt --out DIR``: a ClipModule checkpoint as a plain
open_clip model folder.

``DIR`` is self-contained and loads offline as ``open_clip.create_model_and_transforms("local-dir:DIR")`` (the other
routes: docs/clip.md, "Export"); it always has open_clip's default 0-dim ``logit_scale``. ``--hf-vision HF_DIR`` also
writes the image tower as a HuggingFace CLIP vision folder (e.g. a LLaVA vision tower).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datamodules.io import atomic_write
from lightning_modules.components.clip_model import (
    build_clip,
    clip_state_dict,
    load_checkpoint_file,
    reshape_logit_params,
    resolve_model_config,
)

# Strings whose tokens must come out the same from the exported folder as from the training tokenizer.
_TOKENIZER_PROBES = ("a photo of a red star on the left", "Two   BLUE circles, IMG_2031.jpg!", "", "naïve café 12:30")


def _export_tokenizer(tokenizer: Any, model_cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Save an HF tokenizer's files into ``out`` (open_clip's ``local-dir:`` reads them from there) and return the
    model config with a local ``hf_tokenizer_name`` rewritten to ``"."`` (the folder); a hub id is kept."""
    text_cfg = model_cfg.get("text_cfg") or {}
    name = text_cfg.get("hf_tokenizer_name")
    if not name:  # open_clip's bundled BPE tokenizer: nothing to copy
        return model_cfg
    if not hasattr(tokenizer, "save_pretrained"):
        kind = type(tokenizer).__name__
        raise ValueError(f"the model's tokenizer ({kind}, {name!r}) cannot be saved into the export")
    tokenizer.save_pretrained(str(out))
    path = Path(str(name)).expanduser()
    if path.is_absolute() or str(name).startswith(".") or path.exists():  # a folder of this machine, not a hub id
        model_cfg = {**model_cfg, "text_cfg": {**text_cfg, "hf_tokenizer_name": "."}}
    return model_cfg


def _check_tokenizer(tokenizer: Any, out: Path) -> None:
    """The exported folder's tokenizer, as open_clip loads it, must give the training tokenizer's tokens."""
    import open_clip

    loaded = open_clip.get_tokenizer(f"local-dir:{out}")
    want, got = tokenizer(list(_TOKENIZER_PROBES)), loaded(list(_TOKENIZER_PROBES))
    if want.shape != got.shape or not bool((want == got).all()):
        raise ValueError(
            f"the tokenizer exported to {out} ({type(loaded).__name__}) does not reproduce the model's tokens "
            f"({type(tokenizer).__name__}): check text_cfg.tokenizer_kwargs / hf_tokenizer_name"
        )


def export_clip(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    name: str = "recap-clip-export",
    hf_vision: str | os.PathLike | None = None,
) -> Path:
    """Write the open_clip folder for a ClipModule checkpoint and return its path; with ``hf_vision``, also the
    HuggingFace CLIP vision folder converted from it."""
    ckpt, out = Path(ckpt), Path(out)
    contents = load_checkpoint_file(ckpt)  # read once: hyperparameters and weights come from the same load
    hp = contents.get("hyper_parameters") if isinstance(contents, dict) else None
    if not hp or "model" not in hp:
        raise ValueError(f"{ckpt} has no ClipModule hyper_parameters (is it a ClipModule Lightning checkpoint?)")
    nonscalar = hp.get("nonscalar_logit_scale")
    if nonscalar is None:  # a checkpoint from before ClipModule's switch: a config dict may carry open_clip's key
        cfg, _ = resolve_model_config(hp["model"])
        nonscalar = bool((cfg or {}).get("nonscalar_logit_scale", False))
    args = [hp.get(k) for k in ("context_length", "image_size", "tokenizer")]
    inits = {k: hp.get(k) for k in ("init_logit_scale", "init_logit_bias")}  # a SigLIP model's bias is a weight
    parts = build_clip(hp["model"], *args, nonscalar_logit_scale=nonscalar, **inits)
    model_cfg = parts.model_cfg
    if model_cfg is None:  # a local-dir: model: its folder holds the config
        folder = Path(str(hp["model"]).removeprefix("local-dir:"))
        model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        model_cfg.pop("nonscalar_logit_scale", None)  # the weights below are written in the default layout
    state = clip_state_dict(contents, ckpt)
    reshape_logit_params(state, nonscalar)  # only [] <-> [1] of the two logit parameters
    parts.model.load_state_dict(state, strict=True)  # proves the weights fit the rebuilt config

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model_cfg = _export_tokenizer(parts.tokenizer, model_cfg, out)
    tensors = {k: v.detach().contiguous() for k, v in parts.model.state_dict().items()}
    reshape_logit_params(tensors, nonscalar=False)  # open_clip's default layout, whatever trained it
    atomic_write(out / "open_clip_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = {"model_cfg": model_cfg, "preprocess_cfg": parts.preprocess_cfg}
    atomic_write(out / "open_clip_config.json", json.dumps(config, indent=2))
    atomic_write(out / f"{name}.json", json.dumps(model_cfg, indent=2))
    _check_tokenizer(parts.tokenizer, out)
    if hf_vision is not None:
        from lightning_modules.components.hf_clip_vision import save_hf_vision

        save_hf_vision(out, hf_vision, with_projection="auto")
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m experiments export-clip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="ClipModule Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="output folder (open_clip local-dir layout)")
    parser.add_argument("--name", default="recap-clip-export", help="model config name for add_model_config")
    parser.add_argument("--hf-vision", metavar="OUT_DIR", help="also write the image tower as an HF CLIP vision folder")
    args = parser.parse_args(argv)
    try:
        out = export_clip(args.ckpt, args.out, args.name, hf_vision=args.hf_vision)
    except (ValueError, FileNotFoundError) as e:  # bad input (an unsafe or foreign checkpoint): one line
        print(f"export-clip: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"exported {args.ckpt} -> {out} (open_clip.create_model_and_transforms('local-dir:{out}'))")
    if args.hf_vision:
        print(f"HF vision tower -> {args.hf_vision} (transformers.CLIPVisionModel.from_pretrained)")
    return out
