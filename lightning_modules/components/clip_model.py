"""Build an open_clip model, its tokenizer and its image transforms from a name, a local path or a config dict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn


@dataclass
class ClipParts:
    model: nn.Module
    tokenizer: Any
    preprocess_train: Any
    preprocess_val: Any
    context_length: int


def build_clip(model: str | dict[str, Any], context_length: int | None = None) -> ClipParts:
    """``model`` is an open_clip model name (``"ViT-B-16"``), ``"local-dir:/path"`` (open_clip's own local format),
    a path to a JSON model config, or the config dict itself (``{"embed_dim", "vision_cfg", "text_cfg"}``).

    Never downloads: pretrained weights are loaded by the module from a checkpoint path, not by tag.
    """
    if isinstance(model, str) and model.endswith(".json"):
        model = json.loads(Path(model).read_text())
    if isinstance(model, str) and model.startswith("local-dir:"):
        net = open_clip.create_model(model, output_dict=True)  # open_clip's own config + weights folder
        ctx = net.context_length
        tokenizer = open_clip.get_tokenizer(model, context_length=ctx)
    else:
        if isinstance(model, str):
            named = open_clip.get_model_config(model)
            if named is None:
                raise ValueError(f"unknown open_clip model {model!r}; known: {open_clip.list_models()[:8]}...")
            model = named
        cfg = json.loads(json.dumps(model))  # deep copy
        if context_length is not None:
            cfg.setdefault("text_cfg", {})["context_length"] = context_length
        cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
        net = cls(**cfg, output_dict=True)
        ctx = cfg.get("text_cfg", {}).get("context_length", 77)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
    size = net.visual.image_size
    mean, std = getattr(net.visual, "image_mean", None), getattr(net.visual, "image_std", None)
    return ClipParts(
        model=net,
        tokenizer=tokenizer,
        preprocess_train=open_clip.image_transform(size, is_train=True, mean=mean, std=std),
        preprocess_val=open_clip.image_transform(size, is_train=False, mean=mean, std=std),
        context_length=ctx,
    )


class TokenizeOne:
    """Picklable per-caption tokenizer for loader workers: ``str -> LongTensor[context_length]``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]
