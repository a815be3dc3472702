"""Training objectives beside open_clip's ``ClipLoss``: SigLIP (open_clip's ``SigLipLoss``), the multi-caption
contrastive sum (CLIPS / OpenVision: every step scores each configured caption view) and a caption decoder
(open_clip's CoCa ``MultimodalTransformer``) predicting a caption from the image tokens, optionally prefixed by
another caption (CLIPS). Each one's mean over DDP ranks equals its single-process value on the global batch
(``tests/test_objectives_distributed.py``).
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
    """open_clip's distributed loss: each rank scores its rows against all ranks' features gathered *with* gradients,
    which equals the single-process loss on the global batch."""
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)


def make_contrastive_loss(kind: str = "clip", rank: int = 0, world_size: int = 1) -> nn.Module:
    """``clip``: ``make_clip_loss``. ``siglip``: open_clip's ``SigLipLoss``; each rank sums its rows' sigmoid terms
    against every rank's texts (passed round the ring with gradients) and divides by its *local* batch, so with equal
    per-rank batches the mean over ranks is exactly the global batch's loss (sum over B x B pairs / B)."""
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
    """The id a tokenizer pads with: an HF tokenizer's ``pad_token_id``; open_clip's SimpleTokenizer pads with 0."""
    hf = getattr(tokenizer, "tokenizer", None)
    pad = getattr(hf, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def caption_loss(
    logits: torch.Tensor, target_tokens: torch.Tensor, pad_id: int, out_class: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy, pads ignored, mean over each sample's tokens then over samples: every sample weighs
    the same, so the DDP average of per-rank losses is the global batch's (a flat token mean would weigh ranks by
    their token counts). ``logits [B, L, V]``: ``logits[:, t]`` predicts ``target_tokens[:, t]``; or ``[N, V]``:
    only the non-pad targets' rows, in order (``CaptionDecoder(..., keep=target_tokens != pad_id)``). ``out_class``:
    a shortlist decoder's token id -> output class table (``CaptionDecoder.out_class``)."""
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
    """A causal text decoder (open_clip's CoCa ``MultimodalTransformer``, its projection to the vocabulary) whose
    cross-attention reads the image tokens, projected to its width, and, given ``prefix`` tokens, their embeddings
    too (CLIPS: predict the recaption from the image and the original caption). Prefix pads are masked out of the
    cross-attention; CoCa's forward passes no cross-attention mask, hence the block loop here. ``prefix``: whether
    it reads a prefix (its prefix marker is a parameter only then: DDP stops on a parameter without a gradient)."""

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
        # A shortlist (``output_ids``): the decoder predicts only those token ids plus one "other" class, instead of
        # the whole vocabulary. The vocabulary projection is nearly all of the decoder's cost (49,408 x width per
        # target token: 8.75x a ClipLoss step at batch 128 in the tiny world); a closed-vocabulary world (the tiny
        # one) loses nothing by it. A non-persistent buffer: it follows the device, and is rebuilt from the config.
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
        """Logits ``[B, L, vocab]`` for the next token after each of ``tokens [B, L]``; with ``keep [B, L]``, only the
        kept positions' ``[N, vocab]``: the vocabulary projection is the decoder's largest cost (49408 x width), and
        the pad targets' logits are never used."""
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
