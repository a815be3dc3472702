"""Tests of the CLIP evaluation harness (lightning_modules/evaluation): metric definitions against brute-force
references, token counting, and the wiring of every task (index order, label order, caption -> image mapping) on a
tiny world with an oracle encoder and a random one."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from datamodules.tiny_world import WorldConfig, generate_world
from datamodules.tiny_world.scene import CLASSNAMES
from lightning_modules.evaluation import LongRetrieval, Retrieval, ZeroShotClassification, run_tasks, write_metrics_json
from lightning_modules.evaluation import metrics as metrics_module
from lightning_modules.evaluation.metrics import retrieval_metrics, retrieval_recall, token_lengths, topk_accuracy
from lightning_modules.evaluation.tasks import resolve_classnames, resolve_templates, zero_shot_classifier

TO_TENSOR = transforms.ToTensor()


# ------------------------------------------------------------------------------------------------ references
def brute_force_hit_rate(scores: list[list[float]], positives: list[list[bool]], k: int) -> float:
    """Percent of rows with a positive among the first k columns ranked by (score desc, index asc)."""
    hits = 0
    for row, pos in zip(scores, positives, strict=True):
        ranking = sorted(range(len(row)), key=lambda c: (-row[c], c))
        hits += any(pos[c] for c in ranking[:k])
    return 100.0 * hits / len(scores)


def brute_force_recall(scores: torch.Tensor, positives: torch.Tensor, ks) -> dict[str, float]:
    s, p = scores.tolist(), positives.tolist()
    st, pt = scores.T.tolist(), positives.T.tolist()
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = brute_force_hit_rate(s, p, k)
        out[f"text_to_image_R@{k}"] = brute_force_hit_rate(st, pt, k)
    return out


# 4 images x 10 texts. Positives: image 0 -> texts 0-2, image 1 -> text 3, image 2 -> texts 4-7, image 3 -> texts 8-9.
HAND_SCORES = torch.tensor(
    [
        [0.10, 0.90, 0.20, 0.95, 0.30, 0.30, 0.00, 0.00, 0.00, 0.00],
        [0.80, 0.50, 0.50, 0.50, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00],  # texts 1-3 tie: 3 comes last
        [0.00, 0.00, 0.00, 0.00, 0.70, 0.10, 0.10, 0.10, 0.00, 0.00],
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 0.60],  # column 8 is all zeros: image 3 ranks last
    ]
)
HAND_TEXT_TO_IMAGE = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 3, 3])


def hand_positives() -> torch.Tensor:
    pos = torch.zeros(4, 10, dtype=torch.bool)
    pos[HAND_TEXT_TO_IMAGE, torch.arange(10)] = True
    return pos


# ------------------------------------------------------------------------------------------------ metrics
def test_retrieval_recall_hand_computed():
    got = retrieval_recall(HAND_SCORES, hand_positives(), ks=(1, 2, 3, 4, 5, 10))
    # image->text: image 0 misses at 1 (text 3 on top) and hits at 2 through text 1 (ANY positive counts); image 1
    # needs k=4 because its positive text 3 ties with texts 1, 2 and ties go lowest index first.
    assert got["image_to_text_R@1"] == 50.0
    assert got["image_to_text_R@2"] == 75.0
    assert got["image_to_text_R@3"] == 75.0
    assert got["image_to_text_R@4"] == 100.0
    # text->image: texts 0, 2, 3, 5, 8 miss at 1; only text 8 (all-zero column, image 3 last) still misses at 2 and 3.
    assert got["text_to_image_R@1"] == 50.0
    assert got["text_to_image_R@2"] == 90.0
    assert got["text_to_image_R@3"] == 90.0
    assert got["text_to_image_R@4"] == 100.0
    assert got["image_to_text_R@10"] == got["text_to_image_R@5"] == 100.0  # k capped at the number of candidates
    assert got == brute_force_recall(HAND_SCORES, hand_positives(), ks=(1, 2, 3, 4, 5, 10))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantised", [False, True])
def test_retrieval_recall_matches_brute_force_on_random_scores(seed, quantised, monkeypatch):
    monkeypatch.setattr(metrics_module, "_ROW_CHUNK", 5)  # several row chunks per direction
    g = torch.Generator().manual_seed(seed)
    n_images, n_texts = 13, 47
    text_to_image = torch.cat([torch.arange(n_images), torch.randint(0, n_images, (n_texts - n_images,), generator=g)])
    scores = torch.rand(n_images, n_texts, generator=g)
    if quantised:  # many exact ties
        scores = (scores * 4).floor()
    positives = torch.zeros(n_images, n_texts, dtype=torch.bool)
    positives[text_to_image, torch.arange(n_texts)] = True
    assert retrieval_recall(scores, positives) == brute_force_recall(scores, positives, ks=(1, 5, 10))


def test_retrieval_metrics_from_features():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text_to_image = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5, 5])
    texts = F.normalize(images[text_to_image] + 0.8 * torch.randn(9, 8, generator=g), dim=-1)
    positives = torch.zeros(6, 9, dtype=torch.bool)
    positives[text_to_image, torch.arange(9)] = True
    got = retrieval_metrics(images, texts, text_to_image)
    assert got == brute_force_recall(images @ texts.T, positives, ks=(1, 5, 10))
    assert retrieval_metrics(images, images, torch.arange(6))["text_to_image_R@1"] == 100.0
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(images, texts, text_to_image + 1)


def test_retrieval_recall_rejects_queries_without_positives():
    pos = hand_positives()
    pos[0, 1] = False  # image 0 keeps texts 0 and 2; text 1 is left without an image
    with pytest.raises(ValueError, match="text.* no positive image"):
        retrieval_recall(HAND_SCORES, pos)


def test_topk_accuracy_hand_made():
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 5.0]])
    labels = torch.tensor([0, 1, 2, 0])
    # row 1 ties classes 0 and 1: class 0 ranks first, so its top-1 is a miss.
    assert topk_accuracy(logits, labels, ks=(1, 2, 5)) == {"top1": 25.0, "top2": 75.0, "top5": 100.0}
    assert topk_accuracy(logits, labels) == {"top1": 25.0, "top5": 100.0}


# ------------------------------------------------------------------------------------------------ tokens
@pytest.fixture(scope="module")
def simple_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def test_token_lengths_simple_tokenizer(simple_tokenizer):
    texts = ["a red circle", "", "A  big, GREEN star!  " * 20]
    got = token_lengths(simple_tokenizer, texts)
    assert got == [len(simple_tokenizer.encode(t)) + 2 for t in texts]
    assert got[:2] == [5, 2]  # sot + a/red/circle + eot; sot + eot
    # the count is exactly what the tokenizer needs: it keeps every token iff the count fits the context
    for t, n in zip(texts, got, strict=True):
        full = [simple_tokenizer.sot_token_id, *simple_tokenizer.encode(t), simple_tokenizer.eot_token_id]
        assert (simple_tokenizer([t], context_length=20)[0].tolist()[:n] == full) == (n <= 20)


@pytest.mark.parametrize(("kwargs", "specials"), [({"strip_sep_token": True}, 2), ({"tokenizer_mode": "clips"}, 3)])
def test_token_lengths_hf_tokenizer(tmp_path, kwargs, specials):
    from open_clip.tokenizer import HFTokenizer
    from transformers import BertTokenizer

    words = ["a", "red", "blue", "circle", "star"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    BertTokenizer(vocab=vocab, bos_token="[CLS]", eos_token="[SEP]").save_pretrained(tmp_path)
    tok = HFTokenizer(str(tmp_path), context_length=6, **kwargs)
    texts = [" ".join(words[:n]) for n in range(1, 6)]
    got = token_lengths(tok, texts)
    assert got == [n + specials for n in range(1, 6)]
    for text, n_words, n in zip(texts, range(1, 6), got, strict=True):
        kept = int((tok([text])[0] >= len(vocab) - len(words)).sum())  # word ids survive truncation or not
        assert (kept == n_words) == (n <= 6)


def test_token_lengths_rejects_unknown_tokenizer():
    with pytest.raises(TypeError, match="dict"):
        token_lengths({}, ["a"])


# ------------------------------------------------------------------------------------------------ templates
def test_resolve_imagenet_metadata():
    classnames = resolve_classnames("imagenet")
    templates = resolve_templates("openai")
    assert len(classnames) == 1000
    assert classnames[0] == "tench"
    assert len(templates) == 80
    assert all("tench" in t("tench") for t in templates)
    assert len(resolve_templates("simple")) == 7


def test_resolve_string_templates_and_files(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(["a photo of a {c}.", "{} art"]))
    (tmp_path / "c.json").write_text(json.dumps(["cat", "dog"]))
    assert [t("cat") for t in resolve_templates(tmp_path / "t.json")] == ["a photo of a cat.", "cat art"]
    assert [t("dog") for t in resolve_templates([lambda c: f"x {c}", "y {c}"])] == ["x dog", "y dog"]
    assert resolve_classnames(str(tmp_path / "c.json")) == ["cat", "dog"]
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(["a photo"])
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(["a {name}"])
    (tmp_path / "bad.json").write_text("[not json")
    with pytest.raises(ValueError, match="bad.json"):
        resolve_classnames(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        resolve_templates(str(tmp_path / "missing.json"))


def test_zero_shot_classifier_averages_then_renormalises():
    feats = {"a x": [1.0, 0.0], "b x": [0.0, 1.0], "a y": [1.0, 0.0], "b y": [0.6, 0.8]}
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.tensor([feats[t] for t in texts])

    w = zero_shot_classifier(["x", "y"], resolve_templates(["a {c}", "b {c}"]), encode)
    assert calls == [["a x", "b x", "a y", "b y"]]
    torch.testing.assert_close(w, F.normalize(torch.tensor([[0.5, 0.5], [0.8, 0.4]]), dim=-1))


# ------------------------------------------------------------------------------------------------ tiny world
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_world") / "w"
    generate_world(out, WorldConfig.tiny(seed=0))
    return out


def pixel_key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


class Oracle:
    """One-hot encoders that know the truth: images by pixel hash, texts by a lookup built from the world's truth."""

    def __init__(self) -> None:
        self.image_key: dict[str, str] = {}
        self.text_key: Callable[[str], str] = lambda t: t
        self.vocab: dict[str, int] = {}

    def add_image(self, path: Path, key: str) -> None:
        with Image.open(path) as img:
            self.image_key[pixel_key(TO_TENSOR(img.convert("RGB")))] = key
        self.vocab.setdefault(key, len(self.vocab))

    def _one_hot(self, keys: list[str]) -> torch.Tensor:
        return F.one_hot(torch.tensor([self.vocab[k] for k in keys]), len(self.vocab)).float()

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        return self._one_hot([self.image_key[pixel_key(x)] for x in batch])

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self._one_hot([self.text_key(t) for t in texts])


def random_encoder(dim: int = 64, seed: int = 0) -> Callable[[object], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return lambda xs: F.normalize(torch.randn(len(xs), dim, generator=g), dim=-1)


def retrieval_oracle(world: Path) -> Oracle:
    oracle = Oracle()
    truth = {r["id"]: r["content_key"] for r in pq.read_table(world / "truth" / "retrieval.parquet").to_pylist()}
    assert len(set(truth.values())) == len(truth), "duplicate content keys: R@1 = 100 would not be the maximum"
    caption_key = {}
    for img in json.loads((world / "eval" / "retrieval" / "dataset.json").read_text())["images"]:
        oracle.add_image(world / "eval" / "retrieval" / "images" / img["filename"], truth[img["filename"]])
        caption_key.update({s["raw"]: truth[img["filename"]] for s in img["sentences"]})
    oracle.text_key = caption_key.__getitem__
    return oracle


def long_retrieval_oracle(world: Path) -> Oracle:
    oracle = Oracle()
    root = world / "eval" / "long_retrieval"
    caption_key = {}
    for r in pq.read_table(world / "truth" / "long_retrieval.parquet").to_pylist():
        oracle.add_image(root / "image" / f"{r['id']}.jpg", r["content_key"])
        caption_key[(root / "caption" / f"{r['id']}.txt").read_text().strip()] = r["content_key"]
    assert len(set(caption_key.values())) == len(caption_key)
    oracle.text_key = caption_key.__getitem__
    return oracle


def classify_oracle(world: Path) -> Oracle:
    oracle = Oracle()
    for name in CLASSNAMES:
        oracle.vocab[name] = len(oracle.vocab)
    for r in pq.read_table(world / "truth" / "classify.parquet").to_pylist():
        oracle.add_image(world / "eval" / "classify" / r["id"], CLASSNAMES[r["label"]])
    oracle.text_key = lambda t: max((c for c in CLASSNAMES if c in t), key=len)
    return oracle


def run_one(task, encode_images, encode_texts, tokenizer, context_length: int = 77) -> dict[str, float]:
    out = run_tasks([task], encode_images, encode_texts, TO_TENSOR, tokenizer, context_length, batch_size=10)
    prefix = f"{task.name}/"
    assert all(k.startswith(prefix) for k in out)
    return {k.removeprefix(prefix): v for k, v in out.items()}


def test_tiny_world_datasets_load(world):
    cls = ZeroShotClassification(world / "eval" / "classify")
    ret = Retrieval(world / "eval" / "retrieval" / "dataset.json", world / "eval" / "retrieval")
    long = LongRetrieval(world / "eval" / "long_retrieval")
    assert (len(cls.classnames), len(cls.templates), len(cls.paths)) == (48, 7, 96)
    assert cls.labels.tolist() == [i // 2 for i in range(96)]  # two images per class, sorted class folders
    assert (len(ret.paths), len(ret.texts)) == (48, 240)
    assert ret.text_to_image.tolist() == [i // 5 for i in range(240)]
    assert [p.name for p in long.paths] == [f"{i}.jpg" for i in range(1, 33)]  # numeric, not lexicographic order
    for task in (cls, ret, long):
        image, index = task.image_dataset(TO_TENSOR)[3]
        assert index == 3
        assert image.shape == (3, 64, 64)
        assert image.dtype == torch.float32


def test_tiny_world_oracle_scores_perfectly(world, simple_tokenizer):
    cls = ZeroShotClassification(world / "eval" / "classify")
    ret = Retrieval(world / "eval" / "retrieval" / "dataset.json", world / "eval" / "retrieval")
    long = LongRetrieval(world / "eval" / "long_retrieval")

    oracle = classify_oracle(world)
    assert run_one(cls, oracle.encode_images, oracle.encode_texts, simple_tokenizer) == {"top1": 100.0, "top5": 100.0}
    for task, oracle in ((ret, retrieval_oracle(world)), (long, long_retrieval_oracle(world))):
        got = run_one(task, oracle.encode_images, oracle.encode_texts, simple_tokenizer)
        assert all(got[f"{d}_R@{k}"] == 100.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)), got
        assert (got["n_images"], got["n_texts"]) == (len(task.paths), len(task.texts))


def test_tiny_world_random_encoder_is_near_chance(world, simple_tokenizer):
    cls = ZeroShotClassification(world / "eval" / "classify")
    got = run_one(cls, random_encoder(seed=1), random_encoder(seed=2), simple_tokenizer)
    assert got["top1"] < 15  # chance 2.1 %
    assert got["top5"] < 35  # chance 10.4 %
    ret = Retrieval(world / "eval" / "retrieval" / "dataset.json", world / "eval" / "retrieval")
    got = run_one(ret, random_encoder(seed=3), random_encoder(seed=4), simple_tokenizer)
    assert max(got["image_to_text_R@1"], got["text_to_image_R@1"]) < 15  # chance ~2 %
    assert max(got["image_to_text_R@10"], got["text_to_image_R@10"]) < 50  # chance ~20 %
    long = LongRetrieval(world / "eval" / "long_retrieval")
    got = run_one(long, random_encoder(seed=5), random_encoder(seed=6), simple_tokenizer)
    assert max(got["image_to_text_R@1"], got["text_to_image_R@1"]) < 20  # chance 3 %
    assert max(got["image_to_text_R@10"], got["text_to_image_R@10"]) < 60  # chance 31 %


def test_long_captions_over_context_are_counted_and_warned(world, simple_tokenizer, caplog):
    long = LongRetrieval(world / "eval" / "long_retrieval")
    lengths = [len(simple_tokenizer.encode(t)) + 2 for t in long.texts]
    feats = F.normalize(torch.eye(len(long.paths)), dim=-1)
    encode = lambda texts: feats  # noqa: E731
    for context in (32, 77):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lightning_modules.evaluation.tasks"):
            got = long.compute(feats, encode, simple_tokenizer, context)
        expected = sum(n > context for n in lengths)
        assert got["n_texts_over_context"] == expected
        assert got["frac_texts_over_context"] == pytest.approx(expected / len(lengths))
        assert ("exceed the context length" in caplog.text) == (expected > 0)
    assert 0 < sum(n > 32 for n in lengths) < len(lengths)  # the loop above saw both cases


def test_classnames_count_mismatch_names_the_folder(world):
    with pytest.raises(ValueError, match=r"images has 48 class folders but there are 47 class names"):
        ZeroShotClassification(world / "eval" / "classify", classnames=list(CLASSNAMES[:47]))


# ------------------------------------------------------------------------------------------------ real layouts
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (240, 240, 240)}


def write_jpeg(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), COLOURS[colour]).save(path, quality=95)


def colour_encoder(images: torch.Tensor) -> torch.Tensor:
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255
    mean = images.mean(dim=(2, 3))
    return F.one_hot(torch.cdist(mean, palette).argmin(dim=1), len(COLOURS)).float()


def colour_text_encoder(texts: list[str]) -> torch.Tensor:
    names = list(COLOURS)
    return F.one_hot(torch.tensor([next(i for i, c in enumerate(names) if c in t) for t in texts]), len(names)).float()


def karpathy_image(filename: str, split: str, colour: str, n_captions: int, filepath: str | None = None) -> dict:
    sentences = [{"raw": f"a {colour} thing {i}"} for i in range(n_captions)]
    entry = {"filename": filename, "split": split, "sentences": sentences}
    return entry if filepath is None else {"filepath": filepath, **entry}


def test_coco_style_karpathy_json(tmp_path, simple_tokenizer):
    images = [
        karpathy_image("COCO_val2014_3.jpg", "test", "green", 5, "val2014"),
        karpathy_image("COCO_train2014_1.jpg", "train", "red", 5, "train2014"),
        karpathy_image("COCO_val2014_1.jpg", "test", "blue", 4, "val2014"),
        karpathy_image("COCO_val2014_2.jpg", "restval", "red", 5, "val2014"),
        karpathy_image("COCO_val2014_0.jpg", "val", "white", 5, "val2014"),
        karpathy_image("COCO_val2014_9.jpg", "test", "white", 6, "val2014"),
    ]
    for img in images:
        write_jpeg(tmp_path / "coco" / img["filepath"] / img["filename"], img["sentences"][0]["raw"].split()[1])
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    task = Retrieval(tmp_path / "dataset_coco.json", tmp_path / "coco", name="coco")
    assert task.name == "coco"
    assert [p.relative_to(tmp_path / "coco").as_posix() for p in task.paths] == [
        "val2014/COCO_val2014_3.jpg",
        "val2014/COCO_val2014_1.jpg",
        "val2014/COCO_val2014_9.jpg",
    ]  # JSON order, test split only
    assert task.text_to_image.tolist() == [0] * 5 + [1] * 4 + [2] * 6
    got = run_one(task, colour_encoder, colour_text_encoder, simple_tokenizer)
    assert got["image_to_text_R@1"] == got["text_to_image_R@1"] == 100.0
    assert (got["n_images"], got["n_texts"], got["n_texts_over_context"]) == (3, 15, 0)


def test_flickr_style_karpathy_json(tmp_path, simple_tokenizer):
    images = [
        karpathy_image("100.jpg", "train", "green", 5),
        karpathy_image("200.jpg", "test", "red", 5),
        karpathy_image("300.jpg", "val", "green", 5),
        karpathy_image("400.jpg", "test", "blue", 5),
    ]
    for img in images:
        write_jpeg(tmp_path / "flickr30k-images" / img["filename"], img["sentences"][0]["raw"].split()[1])
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    task = Retrieval(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr30k-images", name="flickr30k")
    assert [p.name for p in task.paths] == ["200.jpg", "400.jpg"]
    got = run_one(task, colour_encoder, colour_text_encoder, simple_tokenizer)
    assert got["image_to_text_R@1"] == got["text_to_image_R@1"] == 100.0
    assert (got["n_images"], got["n_texts"]) == (2, 10)
    (tmp_path / "flickr30k-images" / "400.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="400.jpg"):
        task.image_dataset(TO_TENSOR)


def test_karpathy_json_errors(tmp_path):
    path = tmp_path / "dataset.json"
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        Retrieval(path, tmp_path)
    path.write_text("{oops")
    with pytest.raises(ValueError, match="dataset.json: malformed JSON"):
        Retrieval(path, tmp_path)
    path.write_text(json.dumps({"images": [karpathy_image("a.jpg", "val", "red", 5)]}))
    with pytest.raises(ValueError, match=r"no images in split 'test' \(splits present: \['val'\]\)"):
        Retrieval(path, tmp_path)
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test"}]}))
    with pytest.raises(ValueError, match="images\\[0\\] lacks field 'sentences'"):
        Retrieval(path, tmp_path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="'images' list"):
        Retrieval(path, tmp_path)


def test_urban1k_layout_pairs_by_stem_and_counts_long_captions(tmp_path, simple_tokenizer, caplog):
    root = tmp_path / "Urban1k"
    for stem, colour in (("1", "red"), ("2", "green"), ("10", "blue")):
        write_jpeg(root / "image" / f"{stem}.jpg", colour)
    (root / "caption").mkdir()
    (root / "caption" / "1.txt").write_text("a red thing\n")
    (root / "caption" / "2.txt").write_text("a green thing " + "with many more words " * 30)
    with pytest.raises(FileNotFoundError, match=r"caption[/\\]10\.txt"):
        LongRetrieval(root)
    (root / "caption" / "10.txt").write_text("a blue thing")
    task = LongRetrieval(root)
    assert [p.stem for p in task.paths] == ["1", "2", "10"]
    assert task.texts[0] == "a red thing"
    with caplog.at_level(logging.WARNING):
        got = run_one(task, colour_encoder, colour_text_encoder, simple_tokenizer, context_length=77)
    assert got["image_to_text_R@1"] == got["text_to_image_R@1"] == 100.0
    assert got["n_texts_over_context"] == 1
    assert got["frac_texts_over_context"] == pytest.approx(1 / 3)
    assert "1 of 3 texts" in caplog.text
    (root / "caption" / "11.txt").write_text("orphan")
    with pytest.raises(FileNotFoundError, match=r"11\.txt has no image"):
        LongRetrieval(root)
    with pytest.raises(FileNotFoundError, match="image folder"):
        LongRetrieval(tmp_path / "nowhere")


def test_classification_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ZeroShotClassification(tmp_path / "nowhere", classnames=["a"])
    root = tmp_path / "cls"
    (root / "val" / "n01").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="classnames.json"):
        ZeroShotClassification(root, split_dir="val")
    with pytest.raises(FileNotFoundError, match=r"val: .*n01"):  # an empty class folder
        ZeroShotClassification(root, classnames=["a"], split_dir="val")
    write_jpeg(root / "val" / "n01" / "x.jpg", "red")
    task = ZeroShotClassification(root, classnames=["a"], split_dir="val")
    assert len(task.templates) == 80  # the CLIP prompt ensemble when no templates.json


def test_run_tasks_rejects_duplicate_names(world, simple_tokenizer):
    task = LongRetrieval(world / "eval" / "long_retrieval")
    with pytest.raises(ValueError, match="unique"):
        run_tasks([task, task], colour_encoder, colour_text_encoder, TO_TENSOR, simple_tokenizer, 77)


def test_write_metrics_json(tmp_path):
    path = tmp_path / "a" / "b" / "metrics.json"
    write_metrics_json({"z/top1": 1.5, "a/R@1": 2.0}, path, step=7, tag="test")
    text = path.read_text()
    assert json.loads(text) == {"metrics": {"a/R@1": 2.0, "z/top1": 1.5}, "step": 7, "tag": "test"}
    assert text.index('"a/R@1"') < text.index('"z/top1"')
    assert text.index('"metrics"') < text.index('"step"')
    write_metrics_json({"x": 0.0}, path)
    assert json.loads(path.read_text()) == {"metrics": {"x": 0.0}}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left behind
