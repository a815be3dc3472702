"""Text-to-image evaluation (paper §6, Table 7): FID, CLIP score and a GPT-4V-style judge score, in plain PyTorch.

The paper scores DiT-B/4 generations for COCO-30K prompts (raw captions and their recaptions, Recap-COCO-30K) with FID
against the MSCOCO images, CLIP score with OpenAI ViT-B/32 and Recap-CLIP, and a GPT-4V 1-5 rating (the §4 caption
rating prompt) on a random 3k subset. ``evaluate_generation`` runs all of them on one set of generated images.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from datamodules.prompts import PromptRecord, PromptSet, seeded_subset

from .tasks import read_image_file, write_metrics_json

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
Images = Sequence[Image.Image] | torch.Tensor  # PIL images, or a (N, 3, H, W) uint8 / float-in-[0, 1] tensor
Judge = Callable[[Image.Image, str], str]


def _check_tensor_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (is it [-1, 1]?)")
    return images


def to_uint8_images(images: Images) -> torch.Tensor:
    """``(N, 3, H, W)`` uint8 from PIL images (RGB, all one size) or a uint8 / float ``[0, 1]`` tensor (rounded)."""
    if isinstance(images, torch.Tensor):
        images = _check_tensor_images(images)
        if images.dtype == torch.uint8:
            return images
        return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
    images = list(images)
    if not images:
        raise ValueError("no images")
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"images must all have one size, got {sorted(s[1::-1] for s in sizes)} (W, H)")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _to_float01(images: torch.Tensor) -> torch.Tensor:
    images = _check_tensor_images(images)
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = to_uint8_images(images).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def load_reference_images(images: Sequence[PathLike | Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """Reference images (paths or PIL images) as ``(N, 3, H, W)`` uint8 at ``size = (H, W)``: centre crop and bicubic
    resize, as generated images are square crops of their training images."""
    missing = [p for p in images if not isinstance(p, Image.Image) and not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} reference image(s) missing, e.g. {missing[0]}")
    h, w = size
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            im = read_image_file(im, "reference image")  # 16-bit / transparent images as the loader reads them
        out.append(ImageOps.fit(im.convert("RGB"), (w, h), method=Image.Resampling.BICUBIC))
    return to_uint8_images(out)


INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID InceptionV3 (TF port)
INCEPTION_WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"


def _inception_weights(path: PathLike | None) -> Path:
    """The FID InceptionV3 weight file: ``path``, else ``$FID_INCEPTION_WEIGHTS``, else torch-fidelity's file in the
    torch hub cache (``$TORCH_HOME/hub/checkpoints``), where ``load_state_dict_from_url`` would have put it."""
    if path is None:
        path = os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        if cached.is_file():
            return cached
        raise FileNotFoundError(
            f"FID InceptionV3 weights not found: pass inception_weights=PATH, set ${INCEPTION_WEIGHTS_ENV}, or put "
            f"{INCEPTION_WEIGHTS_FILE} (torch-fidelity v0.2.0 release) in {cached.parent}; nothing is downloaded"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID InceptionV3 weights not found: {path}")
    return path


class _FeatureAdapter(nn.Module):
    """Feeds a feature network the input it wants (InceptionV3: uint8; others: float in [0, 1]), in eval mode
    whatever a parent's ``.train()`` says, and returns float64, so that torchmetrics' ``compute`` keeps float64."""

    def __init__(self, net: nn.Module, wants_uint8: bool, num_features: int):
        super().__init__()
        self.net = net.eval()
        self.wants_uint8 = wants_uint8
        self.num_features = num_features  # read by torchmetrics instead of a dummy 299x299 forward
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> _FeatureAdapter:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8_images(images) if self.wants_uint8 else _to_float01(images)
        with torch.no_grad():
            feats = self.net(x)
        if feats.ndim != 2 or feats.shape[1] != self.num_features:
            raise ValueError(f"feature network returned {tuple(feats.shape)}, expected (N, {self.num_features})")
        return feats.double()


class FID(nn.Module):
    """Fréchet distance between real and generated image features: torchmetrics' ``FrechetInceptionDistance``.

    ``feature`` is an InceptionV3 feature size (2048 is the standard FID; weights from a local file, see
    ``_inception_weights``, needs ``torch-fidelity``) or any ``nn.Module`` mapping float ``[0, 1]`` images to ``(N, D)``
    (``num_features`` read from it, or probed). ``antialias=False`` keeps InceptionV3's TF1-style bilinear
    resize to 299, as the reference implementations do, so numbers compare with published FIDs.
    """

    def __init__(
        self,
        feature: int | nn.Module = 2048,
        inception_weights: PathLike | None = None,
        antialias: bool = False,
    ) -> None:
        super().__init__()
        from torchmetrics.image.fid import FrechetInceptionDistance

        if isinstance(feature, nn.Module):
            net, wants_uint8 = feature, False
            num_features = getattr(feature, "num_features", None)
            if num_features is None:  # probed in eval mode, which _FeatureAdapter keeps it in anyway
                probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    num_features = int(feature.eval()(probe).shape[-1])
        elif isinstance(feature, int) and not isinstance(feature, bool):
            if feature not in (64, 192, 768, 2048):
                raise ValueError(f"InceptionV3 feature must be one of 64, 192, 768, 2048, got {feature}")
            from torchmetrics.image.fid import NoTrainInceptionV3
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

            if not _TORCH_FIDELITY_AVAILABLE:
                raise ModuleNotFoundError("InceptionV3 FID needs torch-fidelity: pip install torch-fidelity")
            weights = _inception_weights(inception_weights)
            net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(feature)],
                feature_extractor_weights_path=str(weights),
                antialias=antialias,
            )
            wants_uint8, num_features = True, feature
        else:
            raise TypeError(f"feature must be an int (InceptionV3) or an nn.Module, got {type(feature).__name__}")
        # normalize=True: torchmetrics passes float images to a custom module untouched (the adapter converts)
        self.metric = FrechetInceptionDistance(
            feature=_FeatureAdapter(net, wants_uint8, int(num_features)), normalize=True, reset_real_features=True
        )

    n_real = property(lambda self: int(self.metric.real_features_num_samples))
    n_fake = property(lambda self: int(self.metric.fake_features_num_samples))

    def update(self, images: Images, real: bool) -> None:
        batch = images if isinstance(images, torch.Tensor) else to_uint8_images(images)
        self.metric.update(_check_tensor_images(batch).to(self.metric.device), real=real)

    def compute(self) -> float:
        if self.n_real < 2 or self.n_fake < 2:
            raise RuntimeError(f"FID needs at least 2 real and 2 fake images, got {self.n_real} and {self.n_fake}")
        return float(self.metric.compute())

    def reset(self, keep_real: bool = False) -> None:
        """Forget the fake images, and the real ones unless ``keep_real`` (reference statistics reused)."""
        self.metric.reset_real_features = not keep_real
        try:
            self.metric.reset()
        finally:
            self.metric.reset_real_features = True


class _ClipScorer:
    """The model in eval mode on ``device``; features under ``no_grad``, as float32."""

    def __init__(self, model: nn.Module, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype


class OpenClipScorer(_ClipScorer):
    """An open_clip model with its eval transform and tokenizer, for ``clip_score``.

    ``model`` is an ``export-clip`` folder (or ``local-dir:DIR``), an open_clip model name with ``pretrained`` = a
    local weight file, ``hf-hub:ORG/NAME`` (the HF cache), or a built ``nn.Module`` (then ``tokenizer`` is required
    and ``preprocess`` defaults to open_clip's eval transform for the model's ``visual.preprocess_cfg``).
    """

    def __init__(
        self,
        model: PathLike | nn.Module,
        pretrained: PathLike | None = None,
        tokenizer: Any = None,
        preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        import open_clip

        if isinstance(model, nn.Module):
            if tokenizer is None:
                raise ValueError("OpenClipScorer(nn.Module) needs the model's tokenizer")
            if preprocess is None:
                cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
                keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
                pre = {k: cfg[k] for k in keys if cfg.get(k) is not None}
                preprocess = open_clip.image_transform(model.visual.image_size, is_train=False, **pre)
        else:
            spec = os.fspath(model)
            own_weights = spec.startswith(("local-dir:", "hf-hub:"))
            if not own_weights and (Path(spec) / "open_clip_config.json").is_file():
                spec, own_weights = f"local-dir:{spec}", True
            if pretrained is not None:
                if own_weights:
                    raise ValueError(f"{spec} carries its own weights; drop pretrained={pretrained}")
                if not Path(pretrained).is_file():
                    raise FileNotFoundError(f"CLIP weights not found: {pretrained} (give a local file)")
            elif not own_weights:
                raise ValueError(f"open_clip model {spec!r} needs pretrained=<local weight file> (or an export folder)")
            model, _, preprocess_val = open_clip.create_model_and_transforms(
                spec, pretrained=None if pretrained is None else os.fspath(pretrained)
            )
            preprocess = preprocess or preprocess_val
            tokenizer = tokenizer or open_clip.get_tokenizer(spec)
        super().__init__(model, device)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.context_length = int(getattr(model, "context_length", None) or tokenizer.context_length)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.stack([self.preprocess(im) for im in _to_pil(images)])
        return self.model.encode_image(x.to(self.device, self.dtype), normalize=True).float()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device), normalize=True).float()

    def count_over_context(self, texts: Sequence[str]) -> int:
        from .metrics import token_lengths

        return sum(n > self.context_length for n in token_lengths(self.tokenizer, texts))


class HFClipScorer(_ClipScorer):
    """A transformers ``CLIPModel`` and ``CLIPProcessor`` from a local folder (e.g. ``openai/clip-vit-base-patch32``).
    transformers 5 returns an output object from ``get_*_features`` (the features are its ``pooler_output``), which
    is what breaks torchmetrics 1.9's ``CLIPScore``; both forms work here."""

    def __init__(self, path: PathLike, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        if not Path(path).is_dir():
            raise FileNotFoundError(f"HF CLIP folder not found: {path}")
        super().__init__(CLIPModel.from_pretrained(os.fspath(path)), device)
        self.processor = CLIPProcessor.from_pretrained(os.fspath(path))
        self.context_length = int(self.model.config.text_config.max_position_embeddings)

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor.image_processor(images=_to_pil(images), return_tensors="pt")["pixel_values"]
        return self._features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tok = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        ).to(self.device)
        return self._features(
            self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        )

    def count_over_context(self, texts: Sequence[str]) -> int:
        ids = self.processor.tokenizer(list(texts), truncation=False)["input_ids"]
        return sum(len(i) > self.context_length for i in ids)


def clip_score(images: Images, prompts: Sequence[str], scorer: Any, batch_size: int = 64) -> dict[str, float]:
    """CLIP score: the mean over (image, prompt) pairs of ``100 * max(cos(E_image, E_prompt), 0)``, with its standard
    error; ``scorer`` has ``encode_image`` (float [0, 1] images) and ``encode_text``.

    This is the definition torchmetrics' ``CLIPScore`` documents (Hessel et al., 2021, w = 100); torchmetrics 1.9 clamps
    the *mean* instead, which differs only when a pair has a negative cosine (``n_pairs_clamped`` counts them).
    ``n_prompts_over_context`` counts the prompts the tokenizer truncates, when the scorer has ``count_over_context``.
    """
    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("clip_score needs at least one (image, prompt) pair")
    if len(images) != n:
        raise ValueError(f"{len(images)} images but {n} prompts")
    cosines = []
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        img = F.normalize(scorer.encode_image(_to_float01(to_uint8_images(images[lo:hi]))).float(), dim=-1)
        txt = F.normalize(scorer.encode_text(prompts[lo:hi]).float().to(img.device), dim=-1)
        if img.shape != txt.shape:
            raise ValueError(f"image features {tuple(img.shape)} and text features {tuple(txt.shape)} differ")
        cosines.append((img * txt).sum(dim=-1).cpu())
    cos = torch.cat(cosines)
    score = (100 * cos.clamp(min=0)).double()
    # standard error of the mean over pairs (what a comparison of two models' scores needs; 0 for one pair)
    se = float(score.std() / math.sqrt(n)) if n > 1 else 0.0
    out = {"clip_score": float(score.mean()), "se": se, "n": float(n), "n_pairs_clamped": float((cos < 0).sum())}
    counter = getattr(scorer, "count_over_context", None)
    if counter is not None:
        n_over = int(counter(prompts))
        out["n_prompts_over_context"] = float(n_over)
        if n_over:
            log.warning("clip_score: %d of %d prompts exceed the text context and are truncated", n_over, n)
    return out


# Paper §4 (GPT-4V caption rating, reused in §6 for DiT generations), verbatim; the paper shows the caption line and
# the instruction as two blocks, joined here by a newline.
JUDGE_PROMPT = (
    "[Image Caption] {caption}\n"
    "Rate whether the caption is of high-quality and fluent and correctly matches the given image. The rating should "
    "be 1-5, where 1 is incorrect and not fluent at all, and 5 is correct and very fluent. Try to just give a "
    "numerical rating. Your response should be in the format: Rating: (int)"
)

_NUMBER = r"[(\[]?\s*(\d+(?:\.\d+)?)\s*[)\]]?(?!\.?\d)"  # 4, (4), [4]; a decimal is captured whole, to be rejected
_OUT_OF_5 = r"(?:\s*(?:/|out\s+of)\s*5(?!\d))?"
_KEYWORD = re.compile(r"\brating\b\s*[*_]*\s*(?:[:=]|\bis\b)?\s*[*_]*\s*" + _NUMBER + _OUT_OF_5, re.IGNORECASE)
_BARE = re.compile(r"[*_\s]*" + _NUMBER + _OUT_OF_5 + r"\s*[.!]?[*_\s]*", re.IGNORECASE)
_RANGE_AFTER = re.compile(r"\s*(?:[-–~/]|\bto\b|\bor\b)\s*[(\[]?\d", re.IGNORECASE)  # 3-4, 3 or 4, 3/4


def _rating_value(text: str) -> int | None:
    value = float(text)
    if value != int(value) or "." in text:  # 3.5, and also "4.0": the prompt asks for an int
        return None
    return int(value) if 1 <= value <= 5 else None


def parse_rating(text: str) -> int | None:
    """The 1-5 rating in a judge's answer (``"Rating: 4"``, ``"**Rating:** 4 out of 5"``, a bare ``"4/5"``), or None
    when there is none or it is ambiguous (out of range, a decimal, a range, several ratings, no word "rating")."""
    if not isinstance(text, str):
        return None
    bare = _BARE.fullmatch(text)
    if bare:
        return _rating_value(bare.group(1))
    values: set[int | None] = set()
    for m in _KEYWORD.finditer(text):
        if _RANGE_AFTER.match(text, m.end()):
            return None
        values.add(_rating_value(m.group(1)))
    if len(values) != 1:
        return None
    return values.pop()


@dataclass
class JudgeResult:
    """``mean`` over the parseable ratings (None when there are none); unparseable answers are counted, not scored."""

    ratings: list[int | None]
    answers: list[str]

    @property
    def n_rated(self) -> int:
        return sum(r is not None for r in self.ratings)

    @property
    def n_unparseable(self) -> int:
        return len(self.ratings) - self.n_rated

    @property
    def mean(self) -> float | None:
        rated = [r for r in self.ratings if r is not None]
        return sum(rated) / len(rated) if rated else None

    def summary(self) -> dict[str, Any]:
        return {"n": len(self.ratings), "n_rated": self.n_rated, "n_unparseable": self.n_unparseable, "mean": self.mean}

    def metrics(self, prefix: str = "judge") -> dict[str, float]:
        return {f"{prefix}/{k}": float(v) for k, v in self.summary().items() if v is not None}


def judge_score(
    images: Images, prompts: Sequence[str], judge: Judge, prompt_template: str = JUDGE_PROMPT
) -> JudgeResult:
    """Ask ``judge(image, prompt_template.format(caption=prompt))`` (a GPT-4V-class client, the paper, or a local VLM
    such as ``LlavaJudge``) for each pair and parse its 1-5 rating; a judge's exception propagates."""
    prompts = list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    answers: list[str] = []
    for i, prompt in enumerate(prompts):
        image = images[i] if isinstance(images[i], Image.Image) else _to_pil(to_uint8_images(images[i : i + 1]))[0]
        answer = judge(image, prompt_template.format(caption=prompt))
        if not isinstance(answer, str):
            raise TypeError(f"judge returned {type(answer).__name__}, expected the answer text")
        answers.append(answer)
    result = JudgeResult([parse_rating(a) for a in answers], answers)
    if result.n_unparseable:
        log.warning("judge: %d of %d answers had no parseable rating", result.n_unparseable, len(prompts))
    return result


class LlavaJudge:
    """The suite's llava-hf captioner (a folder, or built parts with ``.model`` and ``.processor``) as a local judge:
    one greedy answer per ``(image, prompt_text)`` through the captioner's own decoding path. Not GPT-4V."""

    def __init__(
        self,
        model: PathLike | Any,
        device: str | torch.device = "cpu",
        dtype: str | None = None,
        max_new_tokens: int = 16,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            from lightning_modules.components.llava import build_llava

            model = build_llava(pretrained=os.fspath(model), dtype=dtype)
        self.model = model.model.to(device).eval()
        self.processor = model.processor
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens

    def __call__(self, image: Image.Image, prompt_text: str) -> str:
        from lightning_modules.components import llava

        text = llava.caption_prompt_text(self.processor.tokenizer, prompt_text)
        out = llava.greedy_captions(self.model, self.processor, text, [image], self.max_new_tokens, self.device)
        return out[0].text


def _reference_batches(
    reference: Images | Sequence[PathLike] | str, records: Sequence[PromptRecord], size: tuple[int, int], bs: int
) -> Iterator[torch.Tensor]:
    if isinstance(reference, str):
        if reference != "records":
            raise ValueError(f"reference_images must be 'records', paths, PIL images or a tensor, got {reference!r}")
        missing = [r.image_id for r in records if r.image_path is None]
        if missing:
            raise ValueError(
                f"{len(missing)} record(s) have no reference image path (e.g. image_id {missing[0]!r}): give "
                "read_prompt_set an image_root"
            )
        reference = [r.image_path for r in records]
    for lo in range(0, len(reference), bs):
        chunk = reference[lo : lo + bs]
        yield load_reference_images(_to_pil(chunk) if isinstance(chunk, torch.Tensor) else chunk, size)


def evaluate_generation(
    images: Images,
    records: Sequence[PromptRecord],
    out_path: PathLike | None = None,
    *,
    reference_images: Images | Sequence[PathLike] | str | None = None,
    fid: FID | None = None,
    clip_scorers: Mapping[str, Any] | None = None,
    judge: Judge | None = None,
    judge_limit: int | None = None,
    judge_seed: int = 0,
    attribute_judge: Callable[[torch.Tensor, Sequence[PromptRecord]], Mapping[str, float]] | None = None,
    batch_size: int = 50,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Score ``images[i]`` (PIL or a uint8 / float [0, 1] tensor) generated from ``records[i].prompt``; return the
    metrics and write them, with the prompt set, the judge's answers and ``extra``, to ``out_path`` (if given).

    ``reference_images`` are FID's real images (``"records"``: each record's ``image_path``; paths, PIL images or a
    tensor), cropped and resized to the generated size; without them ``fid`` must already hold real statistics.
    ``clip_scorers`` ``{name: scorer}`` give ``clip_score/<name>``; ``judge`` (see ``judge_score``) rates a seeded
    subset of ``judge_limit`` images (paper: 3k); ``attribute_judge(uint8 images, records)`` gives ``attributes/*``.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no generated images")
    if len(records) != n:
        raise ValueError(f"{n} generated images but {len(records)} prompt records")
    size = tuple(to_uint8_images(images[:1]).shape[-2:])
    prompts = [r.prompt for r in records]
    metrics: dict[str, float] = {"n_images": float(n)}
    payload: dict[str, Any] = {}
    if isinstance(records, PromptSet):
        metrics["n_prompts_skipped_empty"] = float(records.n_empty)
        payload["prompt_set"] = {"file": str(records.path), "column": records.column, "n_rows": records.n_rows}

    if fid is not None:
        fid.reset(keep_real=reference_images is None)
        if reference_images is not None:
            for batch in _reference_batches(reference_images, records, size, batch_size):
                fid.update(batch, real=True)
        elif fid.n_real < 2:
            raise ValueError("FID needs reference images: pass reference_images, or add real images to fid first")
        for lo in range(0, n, batch_size):
            fid.update(to_uint8_images(images[lo : lo + batch_size]), real=False)
        metrics.update(fid=fid.compute(), **{"fid/n_real": float(fid.n_real), "fid/n_fake": float(fid.n_fake)})
    elif reference_images is not None:
        log.warning("evaluate_generation: reference_images given without an FID; they are not used")

    for name, scorer in (clip_scorers or {}).items():
        result = clip_score(images, prompts, scorer, batch_size=batch_size)
        metrics[f"clip_score/{name}"] = result.pop("clip_score")
        metrics |= {f"clip_score/{name}/{key}": v for key, v in result.items() if key != "n"}

    if judge is not None:
        idx = seeded_subset(n, judge_limit, judge_seed)
        subset = images[idx] if isinstance(images, torch.Tensor) else [images[i] for i in idx]
        result = judge_score(subset, [prompts[i] for i in idx], judge)
        metrics.update(result.metrics("judge"))
        payload["judge_answers"] = [
            {"image_id": records[i].image_id, "answer": a, "rating": r}
            for i, a, r in zip(idx, result.answers, result.ratings, strict=True)
        ]

    if attribute_judge is not None:
        for key, value in attribute_judge(to_uint8_images(images), records).items():
            metrics[f"attributes/{key}"] = float(value)

    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        log.warning("evaluate_generation: non-finite metrics %s", bad)
    if out_path is not None:
        extra = dict(extra or {})
        clash = {"metrics", "path"} & extra.keys()
        if clash:
            raise ValueError(f"extra must not use the reserved keys {sorted(clash)}")
        write_metrics_json(metrics, out_path, **payload, **extra)
    return metrics
