"""Retrieval recall, top-k accuracy and token counting for CLIP evaluation (plain PyTorch).

Retrieval follows CLIP_benchmark (``zeroshot_retrieval.py``, behind the paper's COCO / Flickr30K numbers): a text hits
when its image is in its top-k; an image hits when ANY of its texts is in its top-k.

Ties. ``torch.topk`` leaves the order of equal scores unspecified, so a tie at the k-th place could be a hit or a miss
depending on the device. Here candidates equal to the k-th score fill the remaining places lowest index first (a
stable descending sort's order); with real features ties are practically absent, so the numbers equal CLIP_benchmark's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_ROW_CHUNK = 1024  # query rows scored at once: bounds the (rows x candidates) temporaries for 5k x 25k score matrices


def _in_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of each row's top-k columns; ties at the k-th score are filled lowest index first (see module doc)."""
    kth = scores.topk(k, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=1) <= room))


def _hit_rate(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """Percent of rows (queries) with at least one positive column among their top-k columns."""
    k = min(k, scores.shape[1])
    hits = 0
    for lo in range(0, scores.shape[0], _ROW_CHUNK):
        block = _in_topk(scores[lo : lo + _ROW_CHUNK], k)
        hits += int((block & positives[lo : lo + _ROW_CHUNK]).any(dim=1).sum())
    return 100.0 * hits / scores.shape[0]


def retrieval_recall(scores: torch.Tensor, positives: torch.Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """``image_to_text_R@{k}`` and ``text_to_image_R@{k}`` in percent from ``[n_images, n_texts]`` similarity scores and
    bool positives (every image and every text needs one); a k above the number of candidates is capped."""
    if scores.ndim != 2 or scores.shape != positives.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be equal 2-D")
    if 0 in scores.shape:
        raise ValueError(f"retrieval needs at least one image and one text, got scores of shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    positives = positives.to(device=scores.device, dtype=torch.bool)
    if not positives.any(dim=1).all():
        raise ValueError(f"{int((~positives.any(dim=1)).sum())} image(s) have no positive text")
    if not positives.any(dim=0).all():
        raise ValueError(f"{int((~positives.any(dim=0)).sum())} text(s) have no positive image")
    out: dict[str, float] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"recall cut-off k must be >= 1, got {k}")
        out[f"image_to_text_R@{k}"] = _hit_rate(scores, positives, k)
        out[f"text_to_image_R@{k}"] = _hit_rate(scores.T, positives.T, k)
    return out


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k from L2-normalised features: scores = images @ texts.T, positives from ``text_to_image``.

    ``text_to_image[t]`` is the index (row of ``image_features``) of the image caption ``t`` describes.
    """
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    text_to_image = text_to_image.to(device=image_features.device, dtype=torch.long)
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({n_texts},)")
    if n_texts and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError(f"text_to_image holds indices outside [0, {n_images})")
    scores = image_features.float() @ text_features.float().to(image_features.device).T
    positives = torch.zeros(n_images, n_texts, dtype=torch.bool, device=scores.device)
    positives[text_to_image, torch.arange(n_texts, device=scores.device)] = True
    return retrieval_recall(scores, positives, ks)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent, keys ``top{k}``; k is capped at the number of classes, ties as in retrieval."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits {tuple(logits.shape)} must be [n, C] and labels {tuple(labels.shape)} must be [n]")
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one sample")
    positives = F.one_hot(labels.to(logits.device).long(), logits.shape[1]).bool()
    return {f"top{k}": _hit_rate(logits.float(), positives, k) for k in ks}


def token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Untruncated token counts, special tokens included (the context positions each text needs), for open_clip's
    ``SimpleTokenizer`` and ``HFTokenizer``. With ``strip_sep_token`` open_clip zeroes [SEP] only after truncating,
    so [SEP] still takes a position; ``tokenizer_mode="clips"`` adds bos, eos and a class token."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    texts = list(texts)
    if isinstance(tokenizer, SimpleTokenizer):
        return [len(tokenizer.encode(t)) + 2 for t in texts]
    if isinstance(tokenizer, HFTokenizer):
        cleaned = [tokenizer.clean_fn(t) for t in texts]
        if not cleaned:
            return []
        if getattr(tokenizer, "tokenizer_mode", "") == "clips":
            ids = tokenizer.tokenizer(cleaned, add_special_tokens=False)["input_ids"]
            return [len(i) + 3 for i in ids]
        return [len(i) for i in tokenizer.tokenizer(cleaned, add_special_tokens=True)["input_ids"]]
    raise TypeError(
        f"token_lengths supports open_clip SimpleTokenizer and HFTokenizer, not {type(tokenizer).__qualname__}"
    )


def derangement(n: int, seed: int | Sequence[int] = 0) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (Sattolo's algorithm: one n-cycle); n >= 2."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm
