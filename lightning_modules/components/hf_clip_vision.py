"""An open_clip ViT image tower (an ``export-clip`` folder) as an HF ``CLIPVisionModel`` /
``CLIPVisionModelWithProjection`` plus ``CLIPImageProcessor`` with identical outputs; towers HF cannot express exactly
are refused (``ValueError``). Hand-written: transformers' wheel has no open_clip converter. Keys follow transformers
5.x: ``CLIPVisionModel``'s have no ``vision_model.`` prefix, ``CLIPVisionModelWithProjection``'s do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

# open_clip's CLIPVisionCfg defaults (open_clip/model.py) that matter here
_HEAD_WIDTH, _MLP_RATIO, _LN_EPS = 64, 4.0, 1e-5
# CLIPVisionCfg keys that cannot change a ViT tower's eval outputs (patch_dropout is the identity outside training,
# the attn_pooler_* sizes and timm_* options are unused without attentional_pool / timm_model_name)
_HARMLESS_KEYS = {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads"}
_HARMLESS_KEYS |= {f"timm_{k}" for k in ("model_pretrained", "pool", "proj", "proj_bias", "drop", "drop_path")}
# CLIPVisionCfg keys refused whenever set: HF's CLIP ViT has no equivalent
_CUSTOM_ATTENTION = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_REFUSED = {
    "timm_model_name": "a timm tower is not an HF CLIP ViT",
    "no_ln_pre": "HF CLIPVisionModel always applies pre_layrnorm",
    "ls_init_value": "HF CLIP encoder layers have no layer scale",
    "attentional_pool": "HF CLIPVisionModel has no attentional pooler",
    "act_kwargs": "HF hidden_act takes no activation arguments",
    **dict.fromkeys(_CUSTOM_ATTENTION, "open_clip's custom attention block is not HF CLIP's"),
}
_HANDLED_KEYS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "pos_embed_type"}
_HANDLED_KEYS |= {"pool_type", "final_ln_after_pool", "norm_kwargs", "block_type", *_REFUSED}
# open_clip's checkpoint file names in a local-dir folder, in open_clip's own order of preference
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
_WEIGHT_FILES += ("open_clip_pytorch_model.pth", "open_clip_model.bin", "open_clip_model.pt", "open_clip_model.pth")


def _square(value: Any, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision_cfg.{key}={list(value)}: HF CLIPVisionModel needs a square {key}")
        value = value[0]
    return int(value)


def hf_vision_config(model_cfg: Mapping[str, Any]) -> CLIPVisionConfig:
    """The ``CLIPVisionConfig`` of an open_clip ViT tower; ``ValueError`` naming the key HF cannot reproduce."""
    vc = dict(model_cfg.get("vision_cfg") or {})
    for key, why in _REFUSED.items():
        if vc.get(key) not in (None, False, {}, ""):
            raise ValueError(f"vision_cfg.{key}={vc[key]!r}: {why}")
    layers = vc.get("layers", 12)
    if isinstance(layers, (list, tuple)):
        raise ValueError(f"vision_cfg.layers={list(layers)}: a ModifiedResNet tower is not an HF CLIP ViT")
    unknown = sorted(set(vc) - _HANDLED_KEYS - _HARMLESS_KEYS)
    if unknown:
        raise ValueError(f"vision_cfg keys {unknown} are unknown to this converter (refusing rather than guessing)")
    if vc.get("block_type") not in (None, "default"):
        raise ValueError(f"vision_cfg.block_type={vc['block_type']!r}: only open_clip's default block is HF CLIP's")
    if vc.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):  # sin_cos_2d is stored as a table
        raise ValueError(f"vision_cfg.pos_embed_type={vc['pos_embed_type']!r} is not a position table")
    norm_kwargs = dict(vc.get("norm_kwargs") or {})
    eps = float(norm_kwargs.pop("eps", _LN_EPS))
    if norm_kwargs:
        raise ValueError(f"vision_cfg.norm_kwargs={vc['norm_kwargs']!r}: only 'eps' maps to HF layer_norm_eps")

    width = int(vc.get("width", 768))
    heads = width // int(vc.get("head_width", _HEAD_WIDTH))
    if heads < 1 or width % heads:
        raise ValueError(f"vision_cfg.head_width={vc.get('head_width')}: width {width} does not split into heads")
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * float(vc.get("mlp_ratio", _MLP_RATIO))),  # open_clip: int(d_model * mlp_ratio)
        num_hidden_layers=int(layers),
        num_attention_heads=heads,
        num_channels=3,
        image_size=_square(vc.get("image_size", 224), "image_size"),
        patch_size=_square(vc.get("patch_size", 16), "patch_size"),
        projection_dim=int(model_cfg.get("embed_dim", 512)),
        # open_clip: QuickGELU if quick_gelu else nn.GELU() (exact erf); HF "gelu" is F.gelu (exact erf) too
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        layer_norm_eps=eps,
        attention_dropout=0.0,
    )


def projection_refusal(model_cfg: Mapping[str, Any]) -> str | None:
    """Why HF's pooled output (``post_layernorm`` on the CLS token, projected) would differ from open_clip's
    ``encode_image``, or ``None`` (``tok`` pooling: the same with or without ``final_ln_after_pool``)."""
    pool = (model_cfg.get("vision_cfg") or {}).get("pool_type", "tok")
    return None if pool == "tok" else f"vision_cfg.pool_type={pool!r}: HF pools the class token only"


def convert_open_clip_visual_state_dict(
    visual_state: Mapping[str, torch.Tensor], config: CLIPVisionConfig, with_projection: bool = True
) -> dict[str, torch.Tensor]:
    """open_clip ``model.visual`` weights as the state dict of ``CLIPVisionModelWithProjection`` (``with_projection``)
    or ``CLIPVisionModel``; a weight left over is refused."""
    src = dict(visual_state)
    pre = "vision_model." if with_projection else ""
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise ValueError(f"open_clip visual weights lack {key!r}")
        return src.pop(key)

    def move(old: str, new: str) -> None:
        for suffix in (".weight", ".bias"):
            out[pre + new + suffix] = take(old + suffix).clone()

    out[pre + "embeddings.patch_embedding.weight"] = take("conv1.weight").clone()
    out[pre + "embeddings.class_embedding"] = take("class_embedding").clone()
    out[pre + "embeddings.position_embedding.weight"] = take("positional_embedding").clone()
    move("ln_pre", "pre_layrnorm")
    for i in range(config.num_hidden_layers):
        old, new = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        move(old + "ln_1", new + "layer_norm1")
        # nn.MultiheadAttention packs [q; k; v] along dim 0 of in_proj_weight / in_proj_bias
        for kind in ("weight", "bias"):
            for name, t in zip("qkv", take(old + f"attn.in_proj_{kind}").chunk(3, dim=0), strict=True):
                out[pre + new + f"self_attn.{name}_proj.{kind}"] = t.clone()
        move(old + "attn.out_proj", new + "self_attn.out_proj")
        move(old + "ln_2", new + "layer_norm2")
        move(old + "mlp.c_fc", new + "mlp.fc1")
        move(old + "mlp.c_proj", new + "mlp.fc2")
    move("ln_post", "post_layernorm")
    proj = take("proj")  # [width, embed_dim], used as x @ proj; an nn.Linear weight is its transpose
    if with_projection:
        out["visual_projection.weight"] = proj.t().contiguous().clone()
    if src:
        raise ValueError(f"open_clip visual weights not used by HF CLIP (layers or blocks HF lacks): {sorted(src)}")
    return out


def hf_image_processor(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None) -> CLIPImageProcessor:
    """``CLIPImageProcessor`` for open_clip's eval transform (not ``resize_mode='longest'``). Pixels equal open_clip's
    without resampling; with it, the crop can sit one pixel off torchvision's and the uint8 resize one level off."""
    pre = {k: v for k, v in dict(preprocess_cfg or {}).items() if v is not None}
    size = _square((model_cfg.get("vision_cfg") or {}).get("image_size", 224), "image_size")
    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"preprocess_cfg.resize_mode={mode!r}: CLIPImageProcessor cannot pad to a square")
    if pre.get("mode", "RGB") != "RGB":
        raise ValueError(f"preprocess_cfg.mode={pre['mode']!r}: CLIPImageProcessor makes RGB images")
    interpolation = pre.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "random"):  # open_clip's eval transform treats 'random' as bicubic
        raise ValueError(f"preprocess_cfg.interpolation={interpolation!r} is not one open_clip knows")

    def per_channel(key: str, default: tuple[float, ...]) -> list[float]:
        value = pre.get(key) or default  # open_clip: `mean or OPENAI_DATASET_MEAN`, scalars broadcast to 3 channels
        return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3

    return CLIPImageProcessor(  # its defaults do the rest: RGB, centre crop, rescale to [0, 1], normalise
        size={"shortest_edge": size} if mode == "shortest" else {"height": size, "width": size},
        resample=PILImageResampling.BILINEAR if interpolation == "bilinear" else PILImageResampling.BICUBIC,
        crop_size={"height": size, "width": size},
        image_mean=per_channel("mean", OPENAI_CLIP_MEAN),
        image_std=per_channel("std", OPENAI_CLIP_STD),
    )


def _read_config(export_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    path = export_dir / "open_clip_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {export_dir} an export-clip / open_clip local-dir folder?)")
    cfg = json.loads(path.read_text())
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise ValueError(f"{path} lacks a 'model_cfg' object")
    return cfg["model_cfg"], cfg.get("preprocess_cfg") or {}


def open_clip_export_to_hf_vision(
    export_dir: str | os.PathLike, with_projection: bool = False
) -> tuple[CLIPVisionModel | CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """``(model in eval mode, image_processor)`` of an ``export-clip`` folder; with the projection, ``image_embeds``
    equal open_clip's un-normalised ``encode_image``."""
    from lightning_modules.components.clip_model import read_state_dict

    export_dir = Path(export_dir)
    model_cfg, preprocess_cfg = _read_config(export_dir)
    try:
        config = hf_vision_config(model_cfg)
        processor = hf_image_processor(model_cfg, preprocess_cfg)
        if with_projection and (why := projection_refusal(model_cfg)):
            raise ValueError(f"{why} (with_projection=False keeps the hidden states, which do match)")
    except ValueError as e:
        raise ValueError(f"{export_dir}: cannot convert to an HF CLIP vision model: {e}") from e

    weights = next((export_dir / n for n in _WEIGHT_FILES if (export_dir / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{export_dir} holds none of {list(_WEIGHT_FILES)}")
    state = read_state_dict(weights)
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"{weights} has no 'visual.' weights")
    try:
        hf_state = convert_open_clip_visual_state_dict(visual, config, with_projection)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from e

    model = (CLIPVisionModelWithProjection if with_projection else CLIPVisionModel)(config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)  # shape mismatches raise here
    if missing or unexpected:
        raise ValueError(f"{weights}: HF weights missing {missing}, unexpected {unexpected}")
    return model.eval(), processor


def save_hf_vision(
    export_dir: str | os.PathLike, out_dir: str | os.PathLike, with_projection: bool | Literal["auto"] = True
) -> Path:
    """``save_pretrained`` of the converted model and image processor; ``"auto"``: the projection wherever exact."""
    if with_projection == "auto":
        with_projection = projection_refusal(_read_config(Path(export_dir))[0]) is None
    model, processor = open_clip_export_to_hf_vision(export_dir, with_projection=bool(with_projection))
    model.save_pretrained(out_dir)  # creates the folder
    processor.save_pretrained(out_dir)
    return Path(out_dir)
