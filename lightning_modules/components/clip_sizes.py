"""Named Recap-CLIP sizes as open_clip model configs, in the released "HTxt" (CLIPA) tower style, at two scales.

Vision ``S-16 / B-16 / L-16 / H-14`` x text ``small / base / large / huge`` are paper Table 2 (scale ``"paper"``);
scale ``"tiny"`` names the tiny world's CPU stand-ins of the same towers. The embed dim of a pairing is the vision
row's, as in the one released pairing (:data:`RELEASED_HTXT_L16`: L/16 + huge text, ``embed_dim 768``). Styles
``"htxt"`` (default, the released one) and ``"openai"`` (open_clip's classic tower) are described in docs/clip.md.
YAML form: ``"recap-clip:B-16:base"``, ``"recap-clip:L-16:huge:openai"``, ``"recap-clip:B-16:base:tiny"``.
"""

from __future__ import annotations

import copy
from typing import Any

PREFIX = "recap-clip:"
STYLES = ("htxt", "openai")
SCALES = ("paper", "tiny")
OPENAI_VOCAB_SIZE = 49408  # open_clip SimpleTokenizer
DEFAULT_HF_TOKENIZER = "bert-base-uncased"
BERT_VOCAB_SIZE = 32000  # CLIPA / released HTxt (bert-base-uncased ids < 30522)

# Table 2, "Recap-CLIP model configurations used in our paper." Param counts in millions, as printed.
TABLE2: dict[str, dict[str, Any]] = {
    "S/16": dict(embed_dim=384, vision=(12, 384, 6), text=(12, 384, 6), params_m=dict(vision=22, text=33, total=55)),
    "B/16": dict(embed_dim=512, vision=(12, 768, 12), text=(12, 512, 8), params_m=dict(vision=86, text=53, total=141)),
    "L/16": dict(
        embed_dim=768, vision=(24, 1024, 16), text=(12, 768, 12), params_m=dict(vision=303, text=109, total=414)
    ),
    "H/14": dict(
        embed_dim=1024, vision=(32, 1280, 16), text=(24, 1024, 16), params_m=dict(vision=631, text=334, total=967)
    ),
}
_TEXT_ROW = {"small": "S/16", "base": "B/16", "large": "L/16", "huge": "H/14"}

VISION_SIZES: dict[str, dict[str, Any]] = {
    row.replace("/", "-"): dict(
        embed_dim=e["embed_dim"],
        layers=e["vision"][0],
        width=e["vision"][1],
        heads=e["vision"][2],
        head_width=e["vision"][1] // e["vision"][2],  # open_clip's key; 64 for S/B/L, 80 for H (1280 / 16)
        patch_size=int(row.split("/")[1]),
    )
    for row, e in TABLE2.items()
}
TEXT_SIZES: dict[str, dict[str, Any]] = {
    name: dict(
        zip(("layers", "width", "heads"), TABLE2[row]["text"], strict=True), table2_embed_dim=TABLE2[row]["embed_dim"]
    )
    for name, row in _TEXT_ROW.items()
}

# The tiny world's stand-ins keep the sizes' order, so Table 4's "larger text encoder" rows stay a capacity ablation.
TINY_VISION: dict[str, dict[str, Any]] = {
    "S-16": dict(embed_dim=48, width=48, layers=2, head_width=24, patch_size=8),
    "B-16": dict(embed_dim=64, width=64, layers=2, head_width=32, patch_size=8),
    "L-16": dict(embed_dim=96, width=96, layers=3, head_width=32, patch_size=8),
    "H-14": dict(embed_dim=128, width=128, layers=4, head_width=32, patch_size=8),
}
TINY_TEXT: dict[str, dict[str, Any]] = {
    "small": dict(width=48, heads=2, layers=2),
    "base": dict(width=64, heads=2, layers=2),
    "large": dict(width=96, heads=3, layers=2),
    "huge": dict(width=128, heads=4, layers=3),
}
# Per scale: the size tables, then the defaults of image side, text context and tokenizer ("auto": by style).
_SCALES: dict[str, tuple[dict, dict, int, int, str | None]] = {
    "paper": (VISION_SIZES, TEXT_SIZES, 224, 128, "auto"),
    "tiny": (TINY_VISION, TINY_TEXT, 64, 64, None),  # the tiny world's captions are <= ~60 BPE tokens
}

# `model_cfg` of UCSC-VLAA/ViT-L-16-HTxt-Recap-CLIP open_clip_config.json (PAPER.md section 5, VERBATIM).
RELEASED_HTXT_L16: dict[str, Any] = {
    "embed_dim": 768,
    "vision_cfg": {
        "image_size": 224,
        "layers": 24,
        "width": 1024,
        "patch_size": 16,
        "no_ln_pre": True,
        "pool_type": "avg",
        "final_ln_after_pool": True,
    },
    "text_cfg": {
        "context_length": 128,
        "vocab_size": 32000,
        "hf_tokenizer_name": "bert-base-uncased",
        "tokenizer_kwargs": {"strip_sep_token": True},
        "width": 1024,
        "heads": 16,
        "layers": 24,
        "pool_type": "last",
        "no_causal_mask": True,
    },
}


def _lookup(table: dict[str, dict[str, Any]], name: str, what: str) -> dict[str, Any]:
    key = name.strip().replace("/", "-")
    key = key.lower() if what == "text" else key.upper()
    if key not in table:
        raise ValueError(f"unknown Recap-CLIP {what} size {name!r}; valid: {sorted(table)}")
    return table[key]


def recap_clip_config(
    vision: str,
    text: str,
    *,
    scale: str = "paper",
    image_size: int | None = None,
    context_length: int | None = None,
    vocab_size: int | None = None,
    tokenizer: str | None = "auto",
    style: str = "htxt",
) -> dict[str, Any]:
    """``open_clip.CLIP(**cfg)``'s config for a vision x text pairing at a scale. ``image_size`` /
    ``context_length`` default to the scale's. ``tokenizer``: an HF tokenizer (``text_cfg.hf_tokenizer_name``),
    ``None`` for open_clip's SimpleTokenizer, ``"auto"``: ``bert-base-uncased`` in the paper's htxt style, else
    ``None``. ``vocab_size=None``: 32000 (BERT, which Table 2's text counts need) with a tokenizer, else 49408."""
    if style not in STYLES:
        raise ValueError(f"unknown Recap-CLIP style {style!r}; valid: {list(STYLES)}")
    if scale not in _SCALES:
        raise ValueError(f"unknown Recap-CLIP scale {scale!r}; valid: {list(_SCALES)}")
    vision_sizes, text_sizes, default_image, default_context, default_tokenizer = _SCALES[scale]
    if tokenizer == "auto":
        tokenizer = DEFAULT_HF_TOKENIZER if style == "htxt" and default_tokenizer == "auto" else None
    if style == "openai" and tokenizer is not None:
        raise ValueError(
            f"style='openai' pools the text at argmax(token id) (SimpleTokenizer's EOT); use tokenizer=None, "
            f"not {tokenizer!r}, or style='htxt' for an HF/BERT tokenizer"
        )
    v = _lookup(vision_sizes, vision, "vision")
    t = _lookup(text_sizes, text, "text")
    vision_cfg = {"image_size": image_size or default_image}
    vision_cfg |= {k: v[k] for k in ("layers", "width", "head_width", "patch_size")}
    vocab = vocab_size if vocab_size is not None else (BERT_VOCAB_SIZE if tokenizer else OPENAI_VOCAB_SIZE)
    text_cfg = {"context_length": context_length or default_context, "vocab_size": vocab}
    text_cfg.update({k: t[k] for k in ("width", "heads", "layers")})
    if style == "htxt":
        vision_cfg.update(no_ln_pre=True, pool_type="avg", final_ln_after_pool=True)
        if tokenizer is not None:
            text_cfg.update(hf_tokenizer_name=tokenizer, tokenizer_kwargs={"strip_sep_token": True})
        # pad_id (open_clip default 0 = BERT [PAD]) is left at its default like the released config: it is only read
        # for a pad mask / CLS embed, and `use_pad_mask` is not a CLIPTextCfg key in open_clip 3.3 (TypeError).
        text_cfg.update(pool_type="last", no_causal_mask=True)
    else:  # openai: class-token vision, causal text, argmax (EOT) pooling -- open_clip's defaults, spelled out
        vision_cfg.update(pool_type="tok")
        text_cfg.update(pool_type="argmax", no_causal_mask=False)
    return {"embed_dim": v["embed_dim"], "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def tiny_model(vision: str, text: str, image_size: int = 64) -> dict[str, Any]:
    """The tiny world's stand-in of a pairing (``scale="tiny"``) at ``image_size``."""
    return recap_clip_config(vision, text, scale="tiny", image_size=image_size)


def parse_model_name(name: str) -> dict[str, Any] | None:
    """``"recap-clip:VISION:TEXT[:STYLE or SCALE]"`` -> :func:`recap_clip_config`; ``None`` for any other name."""
    if not isinstance(name, str) or not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX) :].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(
            f"bad Recap-CLIP model name {name!r}; expected 'recap-clip:<vision>:<text>[:<style or scale>]' with vision "
            f"in {sorted(VISION_SIZES)}, text in {sorted(TEXT_SIZES)}, style in {list(STYLES)}, scale in {list(SCALES)}"
        )
    last = parts[2] if len(parts) == 3 else "htxt"
    if last in SCALES:
        return recap_clip_config(parts[0], parts[1], scale=last)
    return recap_clip_config(parts[0], parts[1], style=last)


def config_mismatches(cfg: dict[str, Any], reference: dict[str, Any] = RELEASED_HTXT_L16, path: str = "") -> list[str]:
    """Keys that ``reference`` sets and ``cfg`` lacks or sets differently (dotted paths); empty = agrees."""
    out: list[str] = []
    for key, ref in reference.items():
        where, got = f"{path}{key}", cfg.get(key)
        if key not in cfg:
            out.append(f"{where}: missing (expected {ref!r})")
        elif isinstance(ref, dict) and not isinstance(got, dict):
            out.append(f"{where}: expected a dict, got {got!r}")
        elif isinstance(ref, dict):
            out += config_mismatches(got, ref, f"{where}.")
        elif got != ref:
            out.append(f"{where}: {got!r} != {ref!r}")
    return out


def count_params(cfg: dict[str, Any]) -> dict[str, int]:
    """Parameter counts of ``open_clip.CLIP(**cfg)`` on the meta device: ``vision`` = ``visual.*`` (``visual.proj``
    included), ``text`` = every other one but the logit scale / bias, ``total``."""
    import open_clip
    import torch

    with torch.device("meta"):
        model = open_clip.CLIP(**copy.deepcopy(cfg))
    params = [(n, p.numel()) for n, p in model.named_parameters() if n not in ("logit_scale", "logit_bias")]
    vision = sum(k for n, k in params if n.startswith("visual."))
    text = sum(k for n, k in params if not n.startswith("visual."))
    return {"vision": vision, "text": text, "total": vision + text}
