"""CLIP evaluation tasks (paper §5: zero-shot classification, Karpathy-split and long-caption retrieval) and their loop.

Each ``EvalTask`` owns its data layout: ``image_dataset(transform)`` yields ``(image, index)`` and ``compute`` turns
the L2-normalised image features (rows in index order) and a text encoder into metrics. ``run_tasks`` is the
standalone loop; the CLIP module feeds its own ``test_step`` features to ``compute``. Retrieval never truncates texts
silently: it counts the captions longer than the text tower's context and warns.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.io import atomic_write

from .metrics import retrieval_metrics, token_lengths, topk_accuracy

log = logging.getLogger(__name__)

PathLike = str | Path
TextEncoder = Callable[[list[str]], torch.Tensor]
Template = Callable[[str], str]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's set


class EvalTask:
    """One evaluation set over the image files ``paths``; ``name`` prefixes the metrics of its ``compute``."""

    name: str
    paths: list[Path]

    def image_dataset(self, transform: Callable[[Image.Image], torch.Tensor]) -> Dataset:
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.name}: {len(missing)} image file(s) missing, e.g. {missing[0]}")
        return _ImageList(self.paths, transform)

    def _check_features(self, image_features: torch.Tensor, n: int) -> None:
        if image_features.ndim != 2 or image_features.shape[0] != n:
            raise ValueError(f"{self.name}: expected image features [{n}, d], got {tuple(image_features.shape)}")

    def _count_over_context(self, texts: Sequence[str], tokenizer: Any, context_length: int) -> dict[str, float]:
        """The texts the text tower will truncate, counted (and warned about), never cut here."""
        lengths = token_lengths(tokenizer, texts)
        n_over = sum(n > context_length for n in lengths)
        if n_over:
            share = f"{n_over} of {len(lengths)} texts ({100 * n_over / len(lengths):.1f}%)"
            log.warning(
                f"{self.name}: {share} exceed the context length {context_length} (longest {max(lengths)} tokens)"
            )
        return {"n_texts_over_context": float(n_over), "frac_texts_over_context": n_over / len(texts)}


class _ImageList(Dataset):
    """``(transform(image), index)`` for a list of image paths; an unreadable image is an error naming the file, never
    a skip (a metric over a silently smaller set would not be comparable)."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_image_file(self.paths[index], "evaluation image")), index


def read_image_file(path: PathLike, what: str) -> Image.Image:
    """An image file as RGB, decoded as the training loader does; any failure is a ``ValueError`` naming the file."""
    from datamodules.wds_stages import decode_image

    try:
        with open(path, "rb") as f:
            return decode_image(f, min_image_size=None)
    except Exception as e:  # PIL raises many types; re-raised with the file
        raise ValueError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e


def _string_list(value: Any, source: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{source}: expected a non-empty list of strings")
    return value


def resolve_classnames(classnames: Sequence[str] | PathLike) -> list[str]:
    """Class names from a list, a path to a JSON list, or ``"imagenet"`` (open_clip's ``IMAGENET_CLASSNAMES``)."""
    if isinstance(classnames, str) and classnames == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if isinstance(classnames, (str, os.PathLike)):
        return _string_list(_read_json(Path(classnames), "classnames file"), str(classnames))
    return _string_list(list(classnames), "classnames")


def _format_template(template: str) -> Template:
    """``"a photo of a {c}."`` (tiny world, CLIP_benchmark) or ``"a photo of a {}."`` as a callable."""
    try:
        if "\0" not in template.format("\0", c="\0"):
            raise ValueError(f"template {template!r} has no class-name placeholder ({{c}} or {{}})")
    except (KeyError, IndexError) as e:
        raise ValueError(f"template {template!r} has a placeholder other than {{c}} or {{}}") from e
    return lambda c: template.format(c, c=c)


def resolve_templates(templates: Sequence[str | Template] | PathLike) -> list[Template]:
    """Prompt templates as callables ``classname -> text``, from callables and/or format strings (``{c}`` or ``{}``), a
    JSON list of format strings, ``"openai"`` (the 80 CLIP prompts) or ``"simple"`` (open_clip's short set)."""
    if isinstance(templates, str) and templates in ("openai", "simple"):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES if templates == "openai" else SIMPLE_IMAGENET_TEMPLATES)
    if isinstance(templates, (str, os.PathLike)):
        templates = _string_list(_read_json(Path(templates), "templates file"), str(templates))
    templates = list(templates)
    if not templates:
        raise ValueError("templates: expected at least one template")
    return [t if callable(t) else _format_template(t) for t in templates]


def zero_shot_classifier(
    classnames: Sequence[str], templates: Sequence[Template], encode_texts: TextEncoder
) -> torch.Tensor:
    """The zero-shot head ``[n_classes, d]``: per class, the mean of its normalised prompt features, renormalised.

    ``open_clip.build_zero_shot_classifier``'s recipe; that function needs a model and a tokenizer (tasks get a
    strings -> features callable) and formats templates positionally, which breaks ``{c}`` templates.
    """
    texts = [template(c) for c in classnames for template in templates]
    feats = encode_texts(texts).float()
    feats = feats.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)


class ZeroShotClassification(EvalTask):
    """Zero-shot classification over an ImageFolder (sorted class dirs = label order): ``top1``, ``top5``.

    Images are in ``root/split_dir`` (``"val"`` for ImageNet), else ``root/images`` if it exists (the tiny world), else
    ``root``. ``classnames`` default to ``root/classnames.json``; ``templates`` to ``root/templates.json`` if present,
    else ``"openai"`` (the CLIP prompt ensemble CLIPA uses for ImageNet).
    """

    def __init__(
        self,
        root: PathLike,
        classnames: Sequence[str] | PathLike | None = None,
        templates: Sequence[str | Template] | PathLike | None = None,
        name: str = "zeroshot",
        split_dir: str | None = None,
    ) -> None:
        self.name = name
        root = _require_dir(Path(root), "classification root")
        if split_dir is not None:
            image_root = _require_dir(root / split_dir, "classification image folder")
        else:
            image_root = root / "images" if (root / "images").is_dir() else root
        if templates is None:
            templates = root / "templates.json" if (root / "templates.json").is_file() else "openai"
        self.classnames = resolve_classnames(root / "classnames.json" if classnames is None else classnames)
        self.templates = resolve_templates(templates)

        from torchvision.datasets.folder import find_classes, make_dataset

        classes, class_to_idx = find_classes(str(image_root))
        if len(classes) != len(self.classnames):
            raise ValueError(
                f"{image_root} has {len(classes)} class folders but there are {len(self.classnames)} class names"
            )
        try:
            samples = make_dataset(str(image_root), class_to_idx, extensions=IMAGE_EXTENSIONS)
        except FileNotFoundError as e:  # torchvision names the empty class folder but not where it is
            raise FileNotFoundError(f"{image_root}: {e}") from e
        self.paths = [Path(p) for p, _ in samples]
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)

    def compute(
        self, image_features: torch.Tensor, encode_texts: TextEncoder, tokenizer: Any, context_length: int
    ) -> dict[str, float]:
        self._check_features(image_features, len(self.paths))
        classifier = zero_shot_classifier(self.classnames, self.templates, encode_texts)
        logits = image_features.float() @ classifier.to(image_features.device).T
        return topk_accuracy(logits, self.labels, ks=(1, 5))


class _RetrievalTask(EvalTask):
    """Image <-> text retrieval over ``(image path, its captions)`` pairs, the one shape every reader produces."""

    def __init__(self, name: str, images: Sequence[tuple[Path, Sequence[str]]], source: Path) -> None:
        self.name, self.paths = name, [path for path, _ in images]
        self.texts = [text for _, texts in images for text in texts]
        if not self.paths or not self.texts:
            raise ValueError(f"{source}: no images or no captions to evaluate")
        self.text_to_image = torch.tensor([i for i, (_, texts) in enumerate(images) for _ in texts], dtype=torch.long)

    def compute(
        self, image_features: torch.Tensor, encode_texts: TextEncoder, tokenizer: Any, context_length: int
    ) -> dict[str, float]:
        self._check_features(image_features, len(self.paths))
        over = self._count_over_context(self.texts, tokenizer, context_length)
        metrics = retrieval_metrics(image_features, encode_texts(self.texts), self.text_to_image, ks=(1, 5, 10))
        return metrics | {"n_images": float(len(self.paths)), "n_texts": float(len(self.texts))} | over


class Retrieval(_RetrievalTask):
    """Retrieval on a Karpathy split JSON (``{"images": [{"filename", "split", "sentences": [{"raw"}], "filepath"?}]}``
    as COCO, Flickr30K and the tiny world ship it): the images of ``split`` at ``image_root / filepath / filename``,
    each raw sentence one of its captions."""

    def __init__(self, karpathy_json: PathLike, image_root: PathLike, split: str = "test", name: str = "retrieval"):
        source, image_root = Path(karpathy_json), Path(image_root)
        data = _read_json(source, "Karpathy split file")
        entries = data.get("images") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{source}: expected an object with an 'images' list")
        images, splits = [], set()
        for i, entry in enumerate(entries):
            try:
                splits.add(entry["split"])
                if entry["split"] != split:
                    continue
                path = image_root / entry.get("filepath", "") / entry["filename"]
                captions = [s["raw"] for s in entry["sentences"]]
            except (KeyError, TypeError) as e:
                raise ValueError(
                    f"{source}: images[{i}] lacks field {e} (needs filename, split, sentences[].raw)"
                ) from e
            if not captions:
                raise ValueError(f"{source}: images[{i}] ({path.name}) has no sentences")
            bad = next((j for j, c in enumerate(captions) if not isinstance(c, str) or not c.strip()), None)
            if bad is not None:
                raise ValueError(f"{source}: images[{i}] ({path.name}) sentences[{bad}].raw is empty or not a string")
            images.append((path, captions))
        if not images:
            raise ValueError(f"{source}: no images in split {split!r} (splits present: {sorted(splits)})")
        super().__init__(name, images, source)


def _stem_order(stem: str) -> tuple[int, int, str]:
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


class LongRetrieval(_RetrievalTask):
    """Long-caption retrieval in the Urban1K layout (``root/image/<i>.jpg``, ``root/caption/<i>.txt``), paired and
    ordered by file stem (numerically when the stems are numbers)."""

    def __init__(self, root: PathLike, name: str = "long_retrieval") -> None:
        root = Path(root)
        image_dir = _require_dir(root / "image", "long-retrieval image folder")
        caption_dir = _require_dir(root / "caption", "long-retrieval caption folder")
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        captions = {p.stem: p for p in caption_dir.glob("*.txt")}
        orphans = sorted(captions.keys() - images.keys(), key=_stem_order)
        if orphans:
            stem = orphans[0]
            raise FileNotFoundError(f"caption {captions[stem]} has no image {image_dir / stem}.<jpg|png|...>")
        pairs = []
        for stem in sorted(images, key=_stem_order):
            if stem not in captions:
                raise FileNotFoundError(f"image {images[stem]} has no caption {caption_dir / f'{stem}.txt'}")
            try:
                text = captions[stem].read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"caption {captions[stem]} is not UTF-8 text ({e})") from e
            if not text:
                raise ValueError(f"empty caption: {captions[stem]}")
            pairs.append((images[stem], [text]))
        super().__init__(name, pairs, root)


def features_by_index(name: str, n: int, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``[n, d]`` features from ``(index, features)`` batches in any order, repeats allowed (a distributed sampler
    pads with them); every index ``0..n-1`` must be present."""
    if not parts:
        raise RuntimeError(f"{name}: encoded 0 of {n} images")
    index = torch.cat([i for i, _ in parts]).long()
    feats = torch.cat([f for _, f in parts])
    out = feats.new_zeros(n, feats.shape[-1])
    out[index.to(feats.device)] = feats
    seen = torch.zeros(n, dtype=torch.bool)
    seen[index.cpu()] = True
    if not seen.all():
        raise RuntimeError(f"{name}: encoded {int(seen.sum())} of {n} images")
    return out


def run_tasks(
    tasks: Sequence[EvalTask],
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_texts: TextEncoder,
    image_transform: Callable[[Image.Image], torch.Tensor],
    tokenizer: Any,
    context_length: int,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Encode each task's images (L2-normalised, placed by index), then score it: ``{"<task>/<metric>": value}``."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    metrics: dict[str, float] = {}
    with torch.no_grad():
        for task in tasks:
            dataset = task.image_dataset(image_transform)
            n = len(dataset)
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
            parts = [(index, encode_images(images.to(device)).float()) for images, index in loader]
            features = features_by_index(task.name, n, parts)
            result = task.compute(features, encode_texts, tokenizer, context_length)
            log.info("%s: %s", task.name, ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
            metrics.update({f"{task.name}/{k}": float(v) for k, v in result.items()})
    return metrics


def write_metrics_json(metrics: Mapping[str, float], path: PathLike, **extra: Any) -> None:
    """Atomically write ``{"metrics": metrics, **extra}`` (keys sorted) to ``path``, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"metrics": dict(metrics), **extra}, indent=2, sort_keys=True)
    atomic_write(path, payload + "\n")
