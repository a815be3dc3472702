"""``python -m experiments import-llava --src DIR --out DIR --vision-tower DIR``: an original-LLaVA checkpoint
(haotian-liu/LLaVA, ``model_type: llava_llama``, e.g. the paper's tennant/llava-llama-3-8b-hqedit) as the llava-hf
folder that the captioner and ``recaption run`` load.

Such a checkpoint holds the LLaMA layers (``model.*``, ``lm_head``), the projector (``model.mm_projector.0/2``) and the
tokenizer, but not the vision tower: LLaVA loads ``mm_vision_tower`` by name, so it comes from ``--vision-tower``, a
local CLIP folder (nothing is downloaded). ``mm_vision_select_layer`` / ``mm_vision_select_feature`` become
``vision_feature_layer`` / ``vision_feature_select_strategy``; ``image_aspect_ratio: pad`` becomes the processor's
padding to a square in the mean colour (LLaVA's ``expand2square``). The image processor resizes with torchvision where
LLaVA's CLIPImageProcessor used PIL: normalised pixels then differ by at most one 8-bit level, on few pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_modules.components.clip_model import load_checkpoint_file

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "model.safetensors",
    "pytorch_model.bin",
)
PROJECTOR = {f"model.mm_projector.{i}.{p}": f"linear_{j}.{p}" for i, j in ((0, 1), (2, 2)) for p in ("weight", "bias")}
# present only where LLaVA trained the tower (unfreeze_mm_vision_tower)
TOWER_PREFIX = "model.vision_tower.vision_tower."
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}  # LLaVA's names -> transformers'
# image_aspect_ratio -> pad to a square first (LLaVA's process_images: anything but pad/anyres is a plain preprocess)
PAD = {"pad": True, "square": False, None: False}
# LLaVA's own config keys: the rest of config.json is the LlamaConfig of the language model
LLAVA_KEYS = {"model_type", "architectures", "image_aspect_ratio", "image_grid_pinpoints", "use_mm_proj"}
LLAVA_PREFIXES = ("mm_", "tune_mm_", "freeze_mm_", "unfreeze_mm_", "tokenizer_")


def read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no config.json (not a model folder)")
    cfg = json.loads(path.read_text())

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{path}: {key} is {cfg.get(key)!r}, {expected}")

    if cfg.get("model_type") != "llava_llama":
        raise bad("model_type", "expected 'llava_llama' (an original-LLaVA checkpoint with a LLaMA decoder)")
    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise bad("mm_projector_type", "llava-hf's projector is mlp2x_gelu (Linear, GELU, Linear) only")
    if cfg.get("mm_vision_select_feature", "patch") not in SELECT_FEATURE:
        raise bad("mm_vision_select_feature", f"expected one of {sorted(SELECT_FEATURE)}")
    if cfg.get("image_aspect_ratio") not in PAD:
        raise bad("image_aspect_ratio", "expected pad or square (anyres is LLaVA-NeXT, not LLaVA-1.5)")
    if cfg.get("mm_patch_merge_type", "flat") != "flat":
        raise bad("mm_patch_merge_type", "expected flat (LLaVA-1.5)")
    if cfg.get("mm_use_im_start_end"):
        raise bad("mm_use_im_start_end", "llava-hf has no <im_start>/<im_end> tokens around the image")
    for key in ("mm_vision_select_layer", "mm_hidden_size"):
        if not isinstance(cfg.get(key), int):
            raise bad(key, "expected an integer")
    return cfg


def _keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    return list(load_checkpoint_file(path))  # torch.load(weights_only=True); a pickled object is refused, named


def weight_map(src: Path) -> tuple[Path, dict[str, Path]]:
    """-> (the file that lists the weights: an index json or the single weight file, {key: file holding it})."""
    for name in WEIGHT_FILES:
        path = src / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return path, dict.fromkeys(_keys(path), path)
        entries = json.loads(path.read_text()).get("weight_map")
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: no 'weight_map' object")
        for shard in sorted(set(entries.values())):
            if not (src / shard).is_file():
                raise FileNotFoundError(f"{path}: weight_map names {shard}, which is not in {src}")
        return path, {key: src / shard for key, shard in entries.items()}
    raise FileNotFoundError(f"{src}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def read_tensors(files: dict[str, Path], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in sorted({files[k] for k in keys}):
        wanted = [k for k in keys if files[k] == path]
        if path.suffix == ".safetensors":  # only these tensors, not the whole multi-GB shard
            with safe_open(str(path), "pt") as f:
                out.update({k: f.get_tensor(k) for k in wanted})
        else:
            state = load_checkpoint_file(path)
            out.update({k: state[k] for k in wanted})
    return out


def check_weights(listing: Path, files: dict[str, Path], text_config) -> list[str]:
    """Name every missing or unknown weight (``from_pretrained`` would draw a missing one at random); -> the tower's
    keys in the checkpoint, if any."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        expected = set(LlamaForCausalLM(text_config).state_dict())
    optional = {"lm_head.weight"} if text_config.tie_word_embeddings else set()
    missing = sorted(((expected - optional) | set(PROJECTOR)) - set(files))
    if missing:
        raise ValueError(f"{listing}: missing weights {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    tower = [k for k in files if k.startswith(TOWER_PREFIX)]
    known = expected | set(PROJECTOR) | set(tower)
    unknown = sorted(k for k in files if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise ValueError(f"{listing}: weights this importer does not know: {', '.join(unknown[:5])}")
    return tower


def import_llava(
    src: str | os.PathLike,
    out: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    chat_template: str | None = "llama3",
) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig

    from lightning_modules.components.llava import build_llava, save_llava

    src = Path(src)
    cfg, where = read_config(src), src / "config.json"
    if vision_tower is None or not (Path(vision_tower) / "config.json").is_file():
        given = "" if vision_tower is None else f"; {vision_tower} has no config.json"
        raise FileNotFoundError(
            f"{where}: mm_vision_tower is {cfg.get('mm_vision_tower')!r}, whose config (and, as a rule,"
            " weights) the checkpoint does not hold (LLaVA loads the tower by name): pass --vision-tower DIR, a local"
            f" folder of that CLIP model (config.json + weights{given})"
        )
    tower = CLIPVisionConfig.from_pretrained(vision_tower)
    if tower.hidden_size != cfg["mm_hidden_size"]:
        raise ValueError(f"{where}: mm_hidden_size {cfg['mm_hidden_size']} != {vision_tower}'s {tower.hidden_size}")
    # CLIP names end in the input size where it is not 224 (...-patch14-336): another size, another token count
    named = re.search(r"-(\d+)$", str(cfg.get("mm_vision_tower", "")))
    if named and int(named.group(1)) != tower.image_size:
        raise ValueError(
            f"{where}: mm_vision_tower {cfg['mm_vision_tower']!r} takes {named.group(1)} px images,"
            f" {vision_tower} takes {tower.image_size}"
        )
    if not (src / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{src}: no tokenizer_config.json (the checkpoint's tokenizer)")
    text = {k: v for k, v in cfg.items() if k not in LLAVA_KEYS and not k.startswith(LLAVA_PREFIXES)}
    text_config = LlamaConfig(**text)
    listing, files = weight_map(src)
    tower_keys = check_weights(listing, files, text_config)
    dtype = next(
        (d for d in (cfg.get("dtype"), cfg.get("torch_dtype")) if d in ("float32", "bfloat16", "float16")), None
    )

    # The LLM loads straight from the checkpoint's files, seen through a folder whose config.json is the LlamaConfig:
    # no copy of 8B weights; the projector and tower keys it skips as unexpected are loaded below.
    with tempfile.TemporaryDirectory() as tmp:
        text_config.save_pretrained(tmp)
        for f in {listing, *files.values()}:
            (Path(tmp) / f.name).symlink_to(f.resolve())
        parts = build_llava(
            vision_tower=str(vision_tower),
            llm=tmp,
            tokenizer=str(src),
            chat_template=chat_template,
            vision_feature_layer=cfg["mm_vision_select_layer"],
            vision_feature_select_strategy=SELECT_FEATURE[cfg.get("mm_vision_select_feature", "patch")],
            image_processor={"do_pad": PAD[cfg.get("image_aspect_ratio")]},
            dtype=dtype,
        )
    model = parts.model.model
    weights = read_tensors(files, [*PROJECTOR, *tower_keys])
    try:
        model.multi_modal_projector.load_state_dict({PROJECTOR[k]: weights[k] for k in PROJECTOR})
        # LLaVA's transformers (4.3x) named them vision_model.*; transformers 5's CLIPVisionModel has no such level
        own = model.vision_tower.state_dict().keys()
        names = {k: k[len(TOWER_PREFIX) :] for k in tower_keys}
        tower_state = {n if n in own else n.removeprefix("vision_model."): weights[k] for k, n in names.items()}
        unexpected = model.vision_tower.load_state_dict(tower_state, strict=False).unexpected_keys
    except RuntimeError as e:  # shapes that do not fit the config
        raise ValueError(f"{listing}: {' '.join(str(e).split())}") from None
    if unexpected:
        raise ValueError(
            f"{listing}: tower weights that {vision_tower}'s CLIP model has no place for: {unexpected[:5]}"
        )
    if dtype is not None:  # LLaVA runs the whole model (tower and projector too) in the checkpoint's dtype
        parts.model.to(getattr(torch, dtype))
    out = save_llava(parts, out)
    # transformers 5 nests the image processor in processor_config.json; older readers (transformers 4, vLLM's
    # loaders) look for preprocessor_config.json, the file whose absence users of the released checkpoint report
    parts.processor.image_processor.save_pretrained(out)
    info = json.loads((out / "recap_suite.json").read_text())
    info["imported_from"] = {"src": str(src), "mm_vision_tower": cfg.get("mm_vision_tower"), "tower": str(vision_tower)}
    (out / "recap_suite.json").write_text(json.dumps(info, indent=2))
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m experiments import-llava", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src", required=True, help="original-LLaVA checkpoint folder (config.json, weights, tokenizer)"
    )
    parser.add_argument("--out", required=True, help="output folder (llava-hf layout)")
    parser.add_argument("--vision-tower", default=None, help="local folder of the config's mm_vision_tower (CLIP)")
    why = "llama3 (default: LLaMA-3's, as the paper's captioner), tokenizer (the checkpoint's own), or a .jinja file"
    parser.add_argument("--chat-template", default="llama3", help=why)
    args = parser.parse_args(argv)
    template = None if args.chat_template == "tokenizer" else args.chat_template
    try:
        out = import_llava(args.src, args.out, args.vision_tower, template)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"import-llava: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"imported {args.src} -> {out} (recaption run --model {out})")
    return out
