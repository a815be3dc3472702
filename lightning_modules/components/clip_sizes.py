"""Named Recap-CLIP sizes (paper Table 2) as open_clip model configs, in the released "HTxt" (CLIPA) tower style.

Vision towers ``S-16 / B-16 / L-16 / H-14`` and text towers ``small / base / large / huge`` are the rows and the text
columns of Table 2. Any vision x text pairing can be built (Table 4 pairs S/16+base, B/16+large, L/16+huge).

**Documented choice -- embed dim of a pairing:** it is the *vision* row's embed dim, and the text tower's projection
maps its width to that dim. The one released pairing, ``UCSC-VLAA/ViT-L-16-HTxt-Recap-CLIP`` (L/16 + huge text), has
``embed_dim 768`` = the L row's, not the H row's 1024 (see :data:`RELEASED_HTXT_L16`).

Styles:

* ``"htxt"`` (default): the released / CLIPA style. Vision: no ``ln_pre``, global average pooling over the patch
  tokens (the class token is still in the sequence but not pooled), LayerNorm after pooling. Text: bidirectional
  (``no_causal_mask``), ``pool_type "last"`` (open_clip takes position ``context_length - 1``, which with the
  ``strip_sep_token`` BERT tokenizer is always a PAD/stripped-SEP id 0 slot that attends to the whole caption),
  BERT WordPiece tokenizer, vocabulary 32000.
* ``"openai"``: open_clip's classic tower: ``ln_pre``, class-token vision pooling, causal text with argmax (EOT)
  pooling and the open_clip ``SimpleTokenizer`` (vocabulary 49408 unless ``vocab_size`` is given; an HF tokenizer is
  refused because argmax pooling relies on SimpleTokenizer's EOT being the largest id).

Scales: ``"paper"`` (Table 2's sizes) and ``"tiny"`` (:data:`TINY_VISION` / :data:`TINY_TEXT`, the tiny world's CPU
stand-ins of the same names: htxt style, patch 8, context 64, open_clip's bundled 49,408-token BPE so nothing downloads).

YAML form: ``"recap-clip:B-16:base"``, ``"recap-clip:L-16:huge:openai"`` or ``"recap-clip:B-16:base:tiny"``, see
:func:`parse_model_name`.
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


def _vision_entry(row: str) -> dict[str, Any]:
    layers, width, heads = TABLE2[row]["vision"]
    return dict(
        embed_dim=TABLE2[row]["embed_dim"],
        layers=layers,
        width=width,
        heads=heads,
        head_width=width // heads,  # open_clip's key; 64 for S/B/L, 80 for H (1280 / 16)
        patch_size=int(row.split("/")[1]),
    )


def _text_entry(row: str) -> dict[str, Any]:
    layers, width, heads = TABLE2[row]["text"]
    return dict(layers=layers, width=width, heads=heads, table2_embed_dim=TABLE2[row]["embed_dim"])


VISION_SIZES: dict[str, dict[str, Any]] = {row.replace("/", "-"): _vision_entry(row) for row in TABLE2}
TEXT_SIZES: dict[str, dict[str, Any]] = {name: _text_entry(row) for name, row in _TEXT_ROW.items()}

# The tiny world's stand-ins: the order S < B < L < H (vision) and small < base < large < huge (text) is kept, so
# Table 4's "larger text encoder" rows remain a capacity ablation in miniature. Every tiny vision tower has patch 8.
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
# Its `preprocess_cfg` (not part of the model config; for the transforms).
RELEASED_HTXT_L16_PREPROCESS: dict[str, Any] = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "resize_mode": "squash",
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
    """Open_clip model config ``{"embed_dim", "vision_cfg", "text_cfg"}`` for a Table 2 vision x text pairing at a
    scale (``"paper"`` or ``"tiny"``), usable as ``open_clip.CLIP(**cfg)``.

    ``vision`` is ``"S-16" | "B-16" | "L-16" | "H-14"`` (``"B/16"`` also accepted), ``text`` is
    ``"small" | "base" | "large" | "huge"``. The embed dim is the vision row's (documented choice, matches the
    released L/16 + huge). ``image_size`` / ``context_length`` default to the scale's (224 / 128 paper, 64 / 64 tiny).
    ``tokenizer`` is an HF tokenizer name or local dir written to ``text_cfg.hf_tokenizer_name``
    (in the htxt style with ``tokenizer_kwargs {"strip_sep_token": True}``); ``None`` means open_clip's
    SimpleTokenizer; ``"auto"`` means the scale's: ``"bert-base-uncased"`` for the paper's htxt style, else ``None``.
    ``style="openai"`` refuses an HF tokenizer: its argmax pooling needs the end-of-text id to be the largest id in
    every sequence, which holds for SimpleTokenizer but not for BERT ([SEP] = 102).
    ``vocab_size=None`` picks 32000 (the BERT vocabulary Table 2's text counts need) when a
    ``tokenizer`` is named and 49408 (SimpleTokenizer) when it is ``None``; pass it to size the embedding explicitly.
    """
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
    vision_cfg: dict[str, Any] = {
        "image_size": image_size or default_image,
        "layers": v["layers"],
        "width": v["width"],
        "head_width": v["head_width"],
        "patch_size": v["patch_size"],
    }
    text_cfg: dict[str, Any] = {
        "context_length": context_length or default_context,
        "vocab_size": vocab_size if vocab_size is not None else (BERT_VOCAB_SIZE if tokenizer else OPENAI_VOCAB_SIZE),
        "width": t["width"],
        "heads": t["heads"],
        "layers": t["layers"],
    }
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
    """``"recap-clip:B-16:base"``, ``"recap-clip:L-16:huge:openai"`` (a style) or ``"recap-clip:B-16:base:tiny"`` (a
    scale) -> config dict (defaults of :func:`recap_clip_config`); ``None`` when ``name`` does not start with
    ``recap-clip:``. Malformed -> ValueError."""
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


def config_mismatches(cfg: dict[str, Any], reference: dict[str, Any] = RELEASED_HTXT_L16) -> list[str]:
    """Keys that ``reference`` sets and ``cfg`` lacks or sets differently (dotted paths); empty = agrees."""
    out: list[str] = []

    def walk(ref: Any, got: Any, path: str) -> None:
        if isinstance(ref, dict):
            if not isinstance(got, dict):
                out.append(f"{path}: expected a dict, got {got!r}")
                return
            for k, rv in ref.items():
                walk(rv, got.get(k, _MISSING), f"{path}.{k}" if path else k)
        elif got is _MISSING:
            out.append(f"{path}: missing (expected {ref!r})")
        elif got != ref:
            out.append(f"{path}: {got!r} != {ref!r}")

    walk(reference, cfg, "")
    return out


_MISSING = object()


def count_params(cfg: dict[str, Any]) -> dict[str, int]:
    """Parameter counts of ``open_clip.CLIP(**cfg)``, built on the meta device (no memory, no init cost).

    * ``vision``: every ``visual.*`` parameter (patch conv, class / positional embeddings, blocks, ``ln_post`` and the
      ``visual.proj`` width -> embed projection).
    * ``text``: every other parameter except ``logit_scale`` / ``logit_bias``, i.e. token embedding + positional
      embedding + transformer blocks + ``ln_final`` + ``text_projection`` (width -> embed dim).
    * ``total``: ``vision + text`` (so also without the logit scale / bias).
    """
    import open_clip
    import torch

    with torch.device("meta"):
        model = open_clip.CLIP(**copy.deepcopy(cfg))
    vision = text = 0
    for name, p in model.named_parameters():
        if name in ("logit_scale", "logit_bias"):
            continue
        if name.startswith("visual."):
            vision += p.numel()
        else:
            text += p.numel()
    return {"vision": vision, "text": text, "total": vision + text}
