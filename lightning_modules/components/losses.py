"""Training objectives beside open_clip's ``ClipLoss``: SigLIP, the multi-caption contrastive sum (CLIPS /
OpenVision) and a caption decoder (open_clip's CoCa ``MultimodalTransformer``, optionally prefixed by another caption as
CLIPS). Each one's mean over DDP ranks equals its single-process value on the global batch (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from open_clip.loss import SigLipLoss
from open_clip.transformer import MultimodalTransformer
from torch import nn

LOSSES = ("clip", "siglip")


def make_clip_loss(rank: int = 0, world_size: int = 1) -> ClipLoss:
    """open_clip's loss over all ranks' features gathered *with* gradients (= the global batch's loss)."""
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)


def make_contrastive_loss(kind: str = "clip", rank: int = 0, world_size: int = 1) -> nn.Module:
    """``clip``: ``make_clip_loss``. ``siglip``: open_clip's ``SigLipLoss``, whose per-rank sums over every rank's
    texts divided by the *local* batch average over equal ranks to the global batch's loss."""
    if kind == "clip":
        return make_clip_loss(rank, world_size)
    if kind == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    raise ValueError(f"loss: {kind!r} is not one of {', '.join(LOSSES)}")


def multi_caption_loss(
    loss_fn: nn.Module,
    image_features: torch.Tensor,
    text_features: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(sum_v weights[v] * loss_fn(image, text[v]), {v: loss_v})`` over the views in ``weights``."""
    missing = sorted(set(weights) - set(text_features))
    if missing:
        raise KeyError(f"text views {missing} have no text features (given: {sorted(text_features)})")
    extra = () if logit_bias is None else (logit_bias,)  # ClipLoss's 4th argument is output_dict, not a bias
    per_view = {v: loss_fn(image_features, text_features[v], logit_scale, *extra) for v in weights}
    total = sum(float(weights[v]) * loss for v, loss in per_view.items())
    return total, per_view


def pad_token_id(tokenizer: Any) -> int:
    """An HF tokenizer's ``pad_token_id``; 0 for open_clip's SimpleTokenizer."""
    hf = getattr(tokenizer, "tokenizer", None)
    pad = getattr(hf, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def caption_loss(
    logits: torch.Tensor, target_tokens: torch.Tensor, pad_id: int, out_class: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy, pads ignored, mean per sample then over samples (so the DDP average of per-rank
    losses is the global batch's; a flat token mean would weigh ranks by token count). ``logits`` are ``[B, L, V]`` or
    the non-pad targets' ``[N, V]`` (``CaptionDecoder(keep=...)``); ``out_class``: a shortlist's id -> class table."""
    keep = target_tokens != pad_id
    targets = target_tokens[keep] if out_class is None else out_class[target_tokens[keep]]
    if logits.ndim == 3:
        logits = logits[keep]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: the softmax in fp32
    ce = F.cross_entropy(logits, targets, reduction="none")
    rows = keep.nonzero()[:, 0]
    per_sample = torch.zeros(len(keep), dtype=ce.dtype, device=ce.device).index_add_(0, rows, ce)
    return (per_sample / keep.sum(1).clamp(min=1)).mean()


class CaptionDecoder(nn.Module):
    """CoCa's causal ``MultimodalTransformer`` cross-attending to the projected image tokens and, with ``prefix``,
    to a prefix caption's embeddings (CLIPS), prefix pads masked (CoCa's forward takes no such mask, hence the block
    loop). The prefix marker exists only with ``prefix``: DDP stops on a parameter without a gradient."""

    def __init__(
        self,
        vocab_size: int,
        image_width: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        pad_id: int,
        prefix: bool = False,
        output_ids: Sequence[int] | None = None,
    ):
        super().__init__()
        self.heads, self.pad_id = heads, pad_id
        # A shortlist (``output_ids``): only those ids plus one "other" class are predicted, since the vocabulary
        # projection is nearly all of the decoder's cost (docs/clip.md). Not persistent: rebuilt from the config.
        out_class, n_out = None, vocab_size
        if output_ids is not None:
            ids = sorted(set(int(i) for i in output_ids))
            if not ids or ids[0] < 0 or ids[-1] >= vocab_size:
                raise ValueError(f"output_ids must be token ids in [0, {vocab_size}), got {len(ids)} ids")
            n_out = len(ids) + 1
            out_class = torch.full((vocab_size,), len(ids), dtype=torch.long)
            out_class[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("out_class", out_class, persistent=False)
        self.image_proj = nn.Linear(image_width, width)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        # marks prefix tokens apart from image tokens
        self.prefix_embedding = nn.Parameter(torch.zeros(width)) if prefix else None
        self.transformer = MultimodalTransformer(
            width=width, layers=layers, heads=heads, context_length=context_length, output_dim=n_out
        )
        # its init_parameters() reads a ``self.transformer`` it does not have, and CoCa never calls it: the output
        # projection would stay torch.empty, so it gets CoCa's intended std here
        nn.init.normal_(self.transformer.text_projection, std=width**-0.5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(
        self,
        image_tokens: torch.Tensor,
        tokens: torch.Tensor,
        prefix: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``[B, L, vocab]`` after ``tokens [B, L]``; with ``keep [B, L]`` only the kept ones'
        ``[N, vocab]`` (the vocabulary projection is the largest cost, and pad targets' logits are never used)."""
        memory = self.image_proj(image_tokens)
        mask = None
        if prefix is not None:
            if self.prefix_embedding is None:
                raise ValueError("this CaptionDecoder was built without a prefix (prefix=False)")
            memory = torch.cat([memory, self.token_embedding(prefix) + self.prefix_embedding], dim=1)
            pad = torch.cat([torch.zeros_like(image_tokens[..., 0], dtype=torch.bool), prefix == self.pad_id], dim=1)
            mask = torch.zeros(pad.shape, dtype=memory.dtype, device=memory.device).masked_fill(pad, float("-inf"))
            mask = mask[:, None, None, :].expand(-1, self.heads, tokens.shape[1], -1).flatten(0, 1)
        t = self.transformer
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        causal = t.attn_mask[: tokens.shape[1], : tokens.shape[1]]
        for block, cross in zip(t.resblocks, t.cross_attn, strict=True):
            x = cross(block(x, attn_mask=causal), k_x=memory, v_x=memory, attn_mask=mask)
        return t.ln_final(x if keep is None else x[keep]) @ t.text_projection
