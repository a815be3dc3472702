"""An open_clip model, its tokenizer and image transforms from a name, a local path or a config dict, with open_clip's
own classes (a released folder is ``model: local-dir:/path``), and safe checkpoint loading. Nothing here downloads."""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import torch
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from torch import nn

log = logging.getLogger(__name__)

# open_clip_config.json's preprocess keys that image_transform understands
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")
# open_clip's temperature (and SigLIP bias): shape [] by default, [1] with ``nonscalar_logit_scale`` (FSDP needs it)
LOGIT_PARAMS = ("logit_scale", "logit_bias")


@dataclass
class ClipParts:
    model: nn.Module
    tokenizer: Any
    preprocess_train: Any
    preprocess_val: Any
    context_length: int
    model_cfg: dict[str, Any] | None  # None for ``local-dir:`` models (their config lives in the folder)
    preprocess_cfg: dict[str, Any]


def resolve_model_config(model: str | Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` for a config dict or JSON path (plain or ``open_clip_config.json`` layout), a
    ``recap-clip:`` name or an open_clip name; ``(None, {})`` for ``local-dir:`` (open_clip reads that folder)."""
    from lightning_modules.components.clip_sizes import parse_model_name

    folder = None  # the folder of a config file, for relative paths in it
    if isinstance(model, str):
        if model.startswith("local-dir:"):
            return None, {}
        if model.endswith(".json"):
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"CLIP model config not found: {path}")
            try:
                model = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"CLIP model config {path} is not valid JSON: {e}") from e
            folder = path.parent
        else:  # a paper size, then an open_clip name
            named = parse_model_name(model) or open_clip.get_model_config(model)
            if named is None:
                raise ValueError(
                    f"unknown CLIP model {model!r}: give an open_clip name ({', '.join(open_clip.list_models()[:6])}, "
                    "...), 'recap-clip:B-16:base', 'local-dir:/path', a .json config path or a config dict"
                )
            model = named
    cfg = json.loads(json.dumps(dict(model)))  # deep, plain copy (jsonargparse may hand us Namespace-like dicts)
    preprocess = {}
    if "model_cfg" in cfg:  # the open_clip_config.json layout
        preprocess = cfg.get("preprocess_cfg", {}) or {}
        cfg = cfg["model_cfg"]
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"CLIP model config lacks {key!r} (keys: {sorted(cfg)})")
    tok = (cfg.get("text_cfg") or {}).get("hf_tokenizer_name")
    if folder is not None and isinstance(tok, str) and (tok == "." or tok.startswith(("./", "../"))):
        # a relative tokenizer folder in a config file (export-clip writes "."): relative to the file's folder
        cfg["text_cfg"]["hf_tokenizer_name"] = str((folder / tok).resolve())
    return cfg, preprocess


def build_clip(
    model: str | Mapping[str, Any],
    context_length: int | None = None,
    image_size: int | None = None,
    tokenizer: str | None = None,
    augmentation: Mapping[str, Any] | None = None,
    train_augment: bool = True,
    nonscalar_logit_scale: bool = False,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
) -> ClipParts:
    """The parts for any ``model`` of ``resolve_model_config`` or a ``local-dir:`` folder (weights loaded), with
    ClipModule's overrides. ``model_cfg`` keeps the ``init_logit_*`` overrides (a logit bias is rebuilt) but never
    ``nonscalar_logit_scale`` (an exported config builds open_clip's default scalar model)."""
    cfg, preprocess = resolve_model_config(model)
    inits = {"init_logit_scale": init_logit_scale, "init_logit_bias": init_logit_bias}
    inits = {k: float(v) for k, v in inits.items() if v is not None}
    if cfg is None:
        if image_size is not None or tokenizer is not None or inits:
            raise ValueError("image_size / tokenizer / init_logit_* overrides need a config, not a 'local-dir:' model")
        # open_clip's load_checkpoint reshapes the folder's logit_scale to the model's ([] <-> [1]) itself
        net = open_clip.create_model(model, output_dict=True, nonscalar_logit_scale=nonscalar_logit_scale)
        ctx = net.context_length
        if context_length is not None and context_length != ctx:
            raise ValueError(f"{model} has context_length {ctx}; cannot override to {context_length}")
        tok = open_clip.get_tokenizer(model, context_length=ctx)
        preprocess = dict(getattr(net.visual, "preprocess_cfg", {}) or {})
    else:
        conflict = logit_layout_conflict(cfg.pop("nonscalar_logit_scale", None), nonscalar_logit_scale)
        if conflict:
            raise ValueError(f"the CLIP model config {conflict}")
        cfg.update(inits)
        text_cfg = cfg.setdefault("text_cfg", {})
        if context_length is not None:
            text_cfg["context_length"] = context_length
        if image_size is not None:
            cfg["vision_cfg"]["image_size"] = image_size
        if tokenizer is not None:
            text_cfg["hf_tokenizer_name"] = tokenizer
        custom = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
        cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
        net = cls(**cfg, output_dict=True, nonscalar_logit_scale=nonscalar_logit_scale)
        ctx = text_cfg.get("context_length", 77)
        if text_cfg.get("hf_tokenizer_name"):  # a hub name already cached, or a save_pretrained folder
            kwargs = text_cfg.get("tokenizer_kwargs") or {}
            tok = open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx, **kwargs)
        else:
            tok = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
        if custom:
            cfg["custom_text"] = True
    size = net.visual.image_size
    pre = {k: preprocess[k] for k in _PREPROCESS_KEYS if preprocess.get(k) is not None}
    train_tf = open_clip.image_transform(size, is_train=train_augment, aug_cfg=augmentation, **pre)
    val_tf = open_clip.image_transform(size, is_train=False, **pre)
    return ClipParts(net, tok, train_tf, val_tf, ctx, cfg, preprocess_cfg={"size": size, **pre})


def load_checkpoint_file(path: str | Path) -> Any:
    """A checkpoint file's contents, loaded safely (safetensors, else ``torch.load(weights_only=True)``); a file that
    needs arbitrary unpickling is refused with one line naming it, without torch's advice to retry unsafely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"pickled object {found.group(1)}" if found else "pickled objects"
        raise ValueError(
            f"cannot load {path}: refused as unsafe: it holds a {what} that loading would execute (only tensors and "
            "plain containers load, weights_only=True); use a checkpoint written by this suite or safetensors"
        ) from None
    except Exception as e:  # noqa: BLE001 - re-raised with the path, whatever torch's loader raised
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load {path} safely (weights_only=True): {first}") from e


def clip_state_dict(ckpt: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The CLIP weights in loaded checkpoint contents: a Lightning checkpoint (``model.``-prefixed), an open_clip
    checkpoint (optionally under ``state_dict``, DDP ``module.`` prefixes) or a bare state dict."""
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(sd, Mapping) or not sd:
        raise ValueError(f"{path} holds no state dict")
    if any(k.startswith("model.") for k in sd):  # a Lightning checkpoint of ClipModule
        sd = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
    if all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return dict(sd)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    return clip_state_dict(load_checkpoint_file(path), path)


def reshape_logit_params(
    state: MutableMapping[str, Any], nonscalar: bool, prefix: str = "", names: Sequence[str] = LOGIT_PARAMS
) -> list[str]:
    """Reshape ``prefix + name`` in ``state`` in place to shape [] or, ``nonscalar``, [1]; return the keys changed.
    Any other shape difference is left for strict loading to report (as open_clip's ``load_checkpoint`` does)."""
    shape = (1,) if nonscalar else ()
    changed = []
    for name in names:
        value = state.get(prefix + name)
        if isinstance(value, torch.Tensor) and tuple(value.shape) in {(), (1,)} and tuple(value.shape) != shape:
            state[prefix + name] = value.reshape(shape)
            changed.append(prefix + name)
    return changed


def logit_layout_conflict(in_cfg: Any, switch: bool) -> str | None:
    """Why a model config's own ``nonscalar_logit_scale`` (None when absent) disagrees with the module's switch."""
    if in_cfg is None or bool(in_cfg) == bool(switch):
        return None
    return (
        f"sets nonscalar_logit_scale: {in_cfg} but the module's nonscalar_logit_scale is {bool(switch)}; set it once, "
        "as model.init_args.nonscalar_logit_scale"
    )


ATTNPOOL_POS_EMBED = "visual.attnpool.positional_embedding"


def resize_attnpool_pos_embed(state: MutableMapping[str, Any], model: nn.Module) -> None:
    """The RN50 family's attention-pool position embedding ``[1 + grid**2, width]`` interpolated in place to
    ``model``'s grid (open_clip's ``resize_pos_embed`` only knows the ViT key); other mismatches are left to loading."""
    old = state.get(ATTNPOOL_POS_EMBED)
    target = getattr(getattr(model.visual, "attnpool", None), "positional_embedding", None)
    if not isinstance(old, torch.Tensor) or target is None or old.shape == target.shape or old.ndim != 2:
        return
    old_grid, new_grid = math.isqrt(old.shape[0] - 1), math.isqrt(target.shape[0] - 1)
    if old.shape[1] != target.shape[1] or old_grid**2 + 1 != old.shape[0] or new_grid**2 + 1 != target.shape[0]:
        return
    shim = {"visual.positional_embedding": old.float()}  # resize_pos_embed reads this key and model.visual.grid_size
    resize_pos_embed(shim, SimpleNamespace(visual=SimpleNamespace(grid_size=(new_grid, new_grid))))
    state[ATTNPOOL_POS_EMBED] = shim["visual.positional_embedding"].to(old.dtype)


def load_clip_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load CLIP weights into ``model``, position embeddings interpolated to its grid and context (CLIPA stage 2: 112
    px -> 224 px; ViT and ModifiedResNet towers) and the logit parameters reshaped to its layout (DDP -> FSDP)."""
    sd = read_state_dict(path)
    reshape_logit_params(sd, model.logit_scale.ndim == 1)
    before = {k: tuple(sd[k].shape) for k in ("visual.positional_embedding", ATTNPOOL_POS_EMBED) if k in sd}
    try:
        resize_pos_embed(sd, model)
        resize_attnpool_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
        for key, shape in before.items():
            if tuple(sd[key].shape) != shape:
                log.info("interpolated %s %s -> %s", key, shape, tuple(sd[key].shape))
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except (AssertionError, RuntimeError) as e:  # open_clip asserts on width changes; torch raises on shapes
        raise ValueError(f"{path} does not match the model's architecture: {e}") from e
    if strict and (missing or unexpected):
        raise ValueError(f"{path} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")


class TokenizeOne:
    """Picklable per-caption tokenizer for loader workers: ``str -> LongTensor[context_length]``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]
