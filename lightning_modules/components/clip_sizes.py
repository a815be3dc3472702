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

YAML form: ``"recap-clip:B-16:base"`` or ``"recap-clip:L-16:huge:openai"``, see :func:`parse_model_name`.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = [
    "RELEASED_HTXT_L16",
    "RELEASED_HTXT_L16_PREPROCESS",
    "STYLES",
    "TABLE2",
    "TEXT_SIZES",
    "VISION_SIZES",
    "config_mismatches",
    "count_params",
    "parse_model_name",
    "recap_clip_config",
]

PREFIX = "recap-clip:"
STYLES = ("htxt", "openai")
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
    if what == "text":
        key = key.lower()
    else:
        key = key.upper()
    if key not in table:
        raise ValueError(f"unknown Recap-CLIP {what} size {name!r}; valid: {sorted(table)}")
    return table[key]


def recap_clip_config(
    vision: str,
    text: str,
    *,
    image_size: int = 224,
    context_length: int = 128,
    vocab_size: int | None = None,
    tokenizer: str | None = "auto",
    style: str = "htxt",
) -> dict[str, Any]:
    """Open_clip model config ``{"embed_dim", "vision_cfg", "text_cfg"}`` for a Table 2 vision x text pairing,
    usable as ``open_clip.CLIP(**cfg)``.

    ``vision`` is ``"S-16" | "B-16" | "L-16" | "H-14"`` (``"B/16"`` also accepted), ``text`` is
    ``"small" | "base" | "large" | "huge"``. The embed dim is the vision row's (documented choice, matches the
    released L/16 + huge). ``tokenizer`` is an HF tokenizer name or local dir written to ``text_cfg.hf_tokenizer_name``
    (in the htxt style with ``tokenizer_kwargs {"strip_sep_token": True}``); ``None`` means open_clip's
    SimpleTokenizer; ``"auto"`` means ``"bert-base-uncased"`` for ``style="htxt"`` and ``None`` for ``"openai"``.
    ``style="openai"`` refuses an HF tokenizer: its argmax pooling needs the end-of-text id to be the largest id in
    every sequence, which holds for SimpleTokenizer but not for BERT ([SEP] = 102).
    ``vocab_size=None`` picks 32000 (the BERT vocabulary Table 2's text counts need) when a
    ``tokenizer`` is named and 49408 (SimpleTokenizer) when it is ``None``; pass it to size the embedding explicitly.
    """
    if style not in STYLES:
        raise ValueError(f"unknown Recap-CLIP style {style!r}; valid: {list(STYLES)}")
    if tokenizer == "auto":
        tokenizer = DEFAULT_HF_TOKENIZER if style == "htxt" else None
    if style == "openai" and tokenizer is not None:
        raise ValueError(
            f"style='openai' pools the text at argmax(token id) (SimpleTokenizer's EOT); use tokenizer=None, "
            f"not {tokenizer!r}, or style='htxt' for an HF/BERT tokenizer"
        )
    v = _lookup(VISION_SIZES, vision, "vision")
    t = _lookup(TEXT_SIZES, text, "text")
    vision_cfg: dict[str, Any] = {
        "image_size": image_size,
        "layers": v["layers"],
        "width": v["width"],
        "head_width": v["head_width"],
        "patch_size": v["patch_size"],
    }
    text_cfg: dict[str, Any] = {
        "context_length": context_length,
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


def parse_model_name(name: str) -> dict[str, Any] | None:
    """``"recap-clip:B-16:base"`` or ``"recap-clip:L-16:huge:openai"`` -> config dict (defaults of
    :func:`recap_clip_config`); ``None`` when ``name`` does not start with ``recap-clip:``. Malformed -> ValueError."""
    if not isinstance(name, str) or not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX) :].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(
            f"bad Recap-CLIP model name {name!r}; expected 'recap-clip:<vision>:<text>[:<style>]' with vision in "
            f"{sorted(VISION_SIZES)}, text in {sorted(TEXT_SIZES)}, style in {list(STYLES)}"
        )
    style = parts[2] if len(parts) == 3 else "htxt"
    return recap_clip_config(parts[0], parts[1], style=style)


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
