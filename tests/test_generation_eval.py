"""Text-to-image evaluation: prompt sets, FID, CLIP score, judge score and the evaluate_generation JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from datamodules.prompts import PromptRecord, read_prompt_set, seeded_subset
from lightning_modules.evaluation.generation import (
    FID,
    JUDGE_PROMPT,
    HFClipScorer,
    LlavaJudge,
    OpenClipScorer,
    clip_score,
    evaluate_generation,
    judge_score,
    load_reference_images,
    parse_rating,
)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------------------------


class TinyFeatures(nn.Module):
    """A fixed random conv net: float images in [0, 1] -> 16 features (scaled to a spread of about 1)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.is_floating_point(), "the adapter must hand over floats"
        assert x.min() >= 0, "... in [0, 1]"
        assert x.max() <= 1, "... in [0, 1]"
        return 100 * self.net(x)


def smooth_images(n: int = 64, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Low-frequency random images (float, [0, 1]): noise added to them visibly changes conv statistics."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False)


def test_fid_self_is_zero_and_grows_with_noise():
    images = smooth_images()
    fid = FID(TinyFeatures())
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(fid.compute()) < 1e-3
    assert fid.metric.compute().dtype == torch.float64  # float64 statistics and result

    g = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=g)
    values = []
    for sigma in (0.05, 0.15, 0.4):
        fid.reset(keep_real=True)
        assert (fid.n_real, fid.n_fake) == (64, 0)
        fid.update((images + sigma * noise).clamp(0, 1), real=False)
        values.append(fid.compute())
    assert 1e-2 < values[0] < values[1] < values[2], values

    fid.reset()
    assert (fid.n_real, fid.n_fake) == (0, 0)
    with pytest.raises(RuntimeError, match="at least 2 real"):
        fid.compute()


def test_fid_uint8_float_and_pil_inputs_agree():
    images = smooth_images(n=48, seed=3)
    as_uint8 = (images * 255).round().to(torch.uint8)
    as_float = as_uint8.float() / 255
    as_pil = [Image.fromarray(a) for a in as_uint8.permute(0, 2, 3, 1).numpy()]

    def fid_of(real, fake) -> float:
        fid = FID(TinyFeatures())
        fid.update(real, real=True)
        fid.update(fake, real=False)
        return fid.compute()

    reference = fid_of(as_uint8[:24], as_uint8[24:])
    assert reference > 1e-3
    assert fid_of(as_float[:24], as_float[24:]) == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert fid_of(as_pil[:24], as_float[24:]) == pytest.approx(reference, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FID(TinyFeatures()).update(images * 2 - 1, real=True)


def test_fid_infers_num_features_and_refuses_to_download(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    fid = FID(net)
    assert fid.metric.real_features_sum.shape == (5,)
    with pytest.raises(ValueError, match="one of 64, 192, 768, 2048"):
        FID(1000)
    # No torch-fidelity here, or no weight file: a clear error either way, never a download attempt
    with pytest.raises((ModuleNotFoundError, FileNotFoundError), match="torch-fidelity|missing.pth"):
        FID(2048, inception_weights=tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------------------------
# Prompt sets
# ---------------------------------------------------------------------------------------------------------------------


def coco_table(n: int = 10) -> pa.Table:
    ids = [str(100 + i) for i in range(n)]
    captions = [f"caption {i}" for i in range(n)]
    captions[3], captions[5] = "   ", None
    recaptions = [f"a detailed recaption {i}" for i in range(n)]
    recaptions[7] = ""
    return pa.table(
        {
            "image_id": ids,
            "coco_url": [f"http://images.cocodataset.org/val2014/COCO_val2014_{int(i):012d}.jpg" for i in ids],
            "caption": captions,
            "recaption": recaptions,
            "extra_col": list(range(n)),
            "image_bytes": pa.array([b"\xff\xd8" * 4] * n, type=pa.binary()),
        }
    )


def test_read_prompt_set_columns_and_empty_prompts(tmp_path):
    path = tmp_path / "recap_coco.parquet"
    pq.write_table(coco_table(), path)

    raw = read_prompt_set(path, column="caption")
    assert (len(raw), raw.n_rows, raw.n_empty, raw.column, raw.path) == (8, 10, 2, "caption", path)
    assert [r.prompt for r in raw] == [f"caption {i}" for i in range(10) if i not in (3, 5)]
    assert [r.image_id for r in raw][:3] == ["100", "101", "102"]
    assert raw[0].row["extra_col"] == 0
    assert raw[0].row["recaption"] == "a detailed recaption 0"
    assert "image_bytes" not in raw[0].row  # binary columns (embedded images) are not read
    assert all(r.image_path is None for r in raw)  # coco_url without an image_root: no local file

    recap = read_prompt_set(path, column="recaption")
    assert (len(recap), recap.n_empty) == (9, 1)
    assert recap[0].prompt == "a detailed recaption 0"


def test_read_prompt_set_refuses_missing_columns(tmp_path):
    path = tmp_path / "no_recaption.parquet"
    pq.write_table(coco_table().drop(["recaption"]), path)
    with pytest.raises(ValueError, match=r"no_recaption\.parquet.*'recaption'"):
        read_prompt_set(path, column="recaption")
    path2 = tmp_path / "no_id.parquet"
    pq.write_table(coco_table().drop(["image_id"]), path2)
    with pytest.raises(ValueError, match=r"no_id\.parquet.*'image_id'"):
        read_prompt_set(path2)
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        read_prompt_set(tmp_path / "absent.parquet")


def test_read_prompt_set_limit_is_a_stable_seeded_subset(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(coco_table(), path)
    full = [r.image_id for r in read_prompt_set(path)]
    a = [r.image_id for r in read_prompt_set(path, limit=4, seed=0)]
    b = [r.image_id for r in read_prompt_set(path, limit=4, seed=0)]
    c = [r.image_id for r in read_prompt_set(path, limit=4, seed=1)]
    assert a == b
    assert len(a) == 4
    assert len(set(a)) == 4
    assert set(a) <= set(full)
    assert a == sorted(a, key=full.index)
    assert a != c
    assert [r.image_id for r in read_prompt_set(path, limit=100)] == full
    assert seeded_subset(10, 3, seed=5) == seeded_subset(10, 3, seed=5)


def write_jpeg(path: Path, colour, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)
    return path


def test_read_prompt_set_resolves_image_paths(tmp_path):
    # Recap-COCO-30K: coco_url's file name (or <image_id>.jpg) under image_root
    path = tmp_path / "coco.parquet"
    pq.write_table(coco_table(), path)
    root = tmp_path / "coco_images"
    by_url = write_jpeg(root / "COCO_val2014_000000000100.jpg", "red")
    by_id = write_jpeg(root / "101.jpg", "blue")
    records = read_prompt_set(path, image_root=root)
    assert records[0].image_path == by_url
    assert records[1].image_path == by_id
    assert records[2].image_path == root / "COCO_val2014_000000000102.jpg"  # not there: named, fails when loaded

    # tiny-world layout: file_name relative to the parquet's folder, or to image_root
    world = tmp_path / "world"
    table = pa.table({"image_id": [0, 1], "caption": ["a", "b"], "file_name": ["images/0.jpg", "images/1.jpg"]})
    world.mkdir()
    pq.write_table(table, world / "prompts.parquet")
    assert read_prompt_set(world / "prompts.parquet")[1].image_path == world / "images/1.jpg"
    other = tmp_path / "elsewhere"
    assert read_prompt_set(world / "prompts.parquet", image_root=other)[0].image_path == other / "images/0.jpg"


def test_tiny_world_prompt_set_reads():
    path = REPO / "data/world/eval/t2i_prompts/prompts.parquet"
    if not path.is_file():
        pytest.skip(f"{path} not built")
    records = read_prompt_set(path, column="recaption", limit=5)
    assert len(records) == 5
    assert all(r.image_path is not None and r.image_path.is_file() for r in records)
    assert "objects" in records[0].row


# ---------------------------------------------------------------------------------------------------------------------
# Judge
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rating"),
    [
        ("Rating: 4", 4),
        ("rating:4/5", 4),
        ("4", 4),
        (" 5.\n", 5),
        ("**Rating:** 2", 2),
        ("Rating: 3. The caption misses the dog.", 3),
        ("Rating: 1 out of 5", 1),
        ("Rating: 4\nRating: 4", 4),
        ("Rating: 5 - accurate and fluent", 5),
    ],
)
def test_parse_rating_accepts(text, rating):
    assert parse_rating(text) == rating


@pytest.mark.parametrize(
    "text",
    [
        "Rating: 0",
        "Rating: 6",
        "7",
        "Rating: 45",
        "Rating: 3-4",
        "Rating: 3 or 4",
        "Rating: 3/4",
        "Rating: 4/10",
        "Rating: 4\nRating: 5",
        "Rating: 4.5",
        "I would give it a 4",
        "Rating: (int)",
        "",
        "cannot rate this image",
    ],
)
def test_parse_rating_rejects(text):
    assert parse_rating(text) is None


def solid_images(values: list[int], size: int = 8) -> torch.Tensor:
    """uint8 images whose red channel holds ``values[i]`` (an index the lookup scorer decodes)."""
    x = torch.zeros(len(values), 3, size, size, dtype=torch.uint8)
    x[:, 0] = torch.tensor(values, dtype=torch.uint8)[:, None, None]
    return x


def test_judge_score_with_a_scripted_judge():
    answers = iter(["Rating: 4", "rating:2/5", "I am not sure what this shows.", "5"])
    seen: list[tuple[int, str]] = []

    def judge(image: Image.Image, prompt_text: str) -> str:
        assert isinstance(image, Image.Image)
        seen.append((image.getpixel((0, 0))[0], prompt_text))
        return next(answers)

    captions = ["a red bus", "two cats", "a tree", "a {weird} caption"]
    result = judge_score(solid_images([0, 10, 20, 30]), captions, judge)
    assert result.ratings == [4, 2, None, 5]
    assert (result.n_rated, result.n_unparseable) == (3, 1)
    assert result.mean == pytest.approx(11 / 3)
    assert [px for px, _ in seen] == [0, 10, 20, 30]
    for (_, text), caption in zip(seen, captions, strict=True):
        assert text == JUDGE_PROMPT.format(caption=caption)
        assert text.startswith(f"[Image Caption] {caption}\n")
        assert "The rating should be 1-5" in text
        assert text.endswith("Your response should be in the format: Rating: (int)")
    assert result.metrics() == {"judge/n": 4.0, "judge/n_rated": 3.0, "judge/n_unparseable": 1.0, "judge/mean": 11 / 3}
    assert "judge/mean" not in judge_score(solid_images([0]), ["x"], lambda im, t: "no idea").metrics()


def test_llava_judge_uses_the_captioner_decoding_path(monkeypatch):
    from lightning_modules.components import llava

    class Tok:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert messages[0]["content"][0] == {"type": "image"}
            assert add_generation_prompt
            assert not tokenize
            return f"<user><image>{messages[0]['content'][1]['text']}<assistant>"

    class Parts:
        model = nn.Linear(1, 1)
        processor = type("Processor", (), {"tokenizer": Tok()})()

    calls = []

    def fake_greedy(model, processor, prompt_text, images, max_new_tokens, device):
        calls.append((prompt_text, len(images), max_new_tokens))
        return [llava.Generated("Rating: 3", 3, False)]

    monkeypatch.setattr(llava, "greedy_captions", fake_greedy)
    result = judge_score(solid_images([0, 1]), ["a cat", "a dog"], LlavaJudge(Parts(), max_new_tokens=8))
    assert result.ratings == [3, 3]
    assert calls[1] == (f"<user><image>{JUDGE_PROMPT.format(caption='a dog')}<assistant>", 1, 8)


# ---------------------------------------------------------------------------------------------------------------------
# CLIP score
# ---------------------------------------------------------------------------------------------------------------------


class LookupScorer:
    """Known features: image i (red channel value i) -> ``image_table[i]``; text "t<j>" -> ``text_table[j]``."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor, over: int = 0):
        self.image_table, self.text_table, self.over = image_table, text_table, over

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        assert images.is_floating_point()
        assert images.max() <= 1
        return self.image_table[(images[:, 0, 0, 0] * 255).round().long()]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.text_table[[int(t[1:]) for t in texts]]

    def count_over_context(self, texts) -> int:
        return self.over


def test_clip_score_definition_with_known_features():
    eye = torch.eye(3)
    scorer = LookupScorer(3 * eye, torch.cat([eye, -eye, torch.tensor([[1.0, 1.0, 0.0]])]), over=1)
    images = solid_images([0, 1, 2])
    matching = clip_score(images, ["t0", "t1", "t2"], scorer)
    mismatched = clip_score(images, ["t1", "t2", "t0"], scorer)
    assert matching["clip_score"] == pytest.approx(100.0)  # features are normalised before the cosine
    assert mismatched["clip_score"] == pytest.approx(0.0)
    assert matching["clip_score"] > mismatched["clip_score"]
    assert (matching["n"], matching["n_prompts_over_context"]) == (3, 1)
    # max(cos, 0) per pair, not a clamp of the mean: cos = +1/sqrt(2) and -1 -> (70.7 + 0) / 2
    per_pair = clip_score(solid_images([0, 0]), ["t6", "t3"], scorer, batch_size=1)
    assert per_pair["clip_score"] == pytest.approx(100 / 2**0.5 / 2)
    assert per_pair["n_pairs_clamped"] == 1
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        clip_score(solid_images([0, 1]), ["t0", "t1", "t2"], scorer)


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def direct_clip_score(img_feats: torch.Tensor, txt_feats: torch.Tensor) -> tuple[float, int, float]:
    """Mean per-pair score, pairs clamped, and the standard error of the mean (sd over pairs / sqrt(n))."""
    cos = (F.normalize(img_feats, dim=-1) * F.normalize(txt_feats, dim=-1)).sum(-1)
    score = (100 * torch.clamp(cos, min=0)).double()
    return float(score.mean()), int((cos < 0).sum()), float(score.std() / len(score) ** 0.5)


PROMPTS = ["a red circle", "a blue star", "two green squares", "a cat", " ".join(["a very long caption"] * 8)]


def pil_images(n: int = 5, size=(48, 40)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_open_clip_scorer_matches_direct_computation_and_loads_an_export(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from lightning_modules.components.clip_model import build_clip

    with torch.random.fork_rng():
        torch.manual_seed(0)
        parts = build_clip(TINY_CLIP)
    model = parts.model.eval()
    images = pil_images()
    with torch.no_grad():
        img = model.encode_image(torch.stack([parts.preprocess_val(im) for im in images]))
        txt = model.encode_text(parts.tokenizer(PROMPTS))
    expected, n_neg, se = direct_clip_score(img, txt)

    scorer = OpenClipScorer(model, tokenizer=parts.tokenizer)  # preprocess: open_clip's eval transform
    got = clip_score(images, PROMPTS, scorer, batch_size=2)
    assert got["clip_score"] == pytest.approx(expected, abs=1e-4)
    assert got["n_pairs_clamped"] == n_neg
    assert se > 0
    assert got["se"] == pytest.approx(se, rel=1e-4)  # accumulated across batches of 2
    assert got["n_prompts_over_context"] == 1  # only the long one exceeds 16 tokens

    # the same model as an export-clip folder (open_clip local-dir layout)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    exported = OpenClipScorer(tmp_path)
    assert isinstance(exported.tokenizer, open_clip.tokenizer.SimpleTokenizer)
    assert exported.context_length == 16
    assert clip_score(images, PROMPTS, exported)["clip_score"] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="pretrained"):
        OpenClipScorer("ViT-B-32")  # a name without a local weight file would download: refused


def test_hf_clip_scorer_matches_direct_computation(tmp_path):
    import gzip

    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    # the OpenAI CLIP BPE shipped with open_clip, as an HF tokenizer (ENVIRONMENT.md recipe)
    with gzip.open(open_clip.tokenizer.default_bpe()) as f:
        lines = f.read().decode().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={s: i for i, s in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges])
    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text.update(num_attention_heads=2, max_position_embeddings=16, bos_token_id=49406, eos_token_id=49407)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision.update(image_size=32, patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(tmp_path)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(tmp_path)

    images = pil_images()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=ip(images=images, return_tensors="pt")["pixel_values"])
        t = tok(PROMPTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
        txt = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
    expected, _, _ = direct_clip_score(img, txt)

    got = clip_score(images, PROMPTS, HFClipScorer(tmp_path), batch_size=3)
    assert got["clip_score"] == pytest.approx(expected, abs=1e-4)
    assert got["n_prompts_over_context"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# evaluate_generation
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluate_generation_writes_the_metrics_json(tmp_path):
    n = 6
    world = tmp_path / "t2i"
    refs = smooth_images(n=n, size=40, seed=7)
    for i in range(n):
        arr = (refs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        (world / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).resize((48, 40)).save(world / "images" / f"{i}.png")
    table = pa.table(
        {
            "image_id": list(range(n + 1)),
            "caption": [f"t{i}" for i in range(n)] + [None],
            "file_name": [f"images/{i}.png" for i in range(n + 1)],
        }
    )
    pq.write_table(table, world / "prompts.parquet")
    records = read_prompt_set(world / "prompts.parquet")
    generated = solid_images(list(range(n)), size=32)
    generated[:, 1:] = (smooth_images(n=n, seed=8) * 255).round().to(torch.uint8)[:, 1:]  # red channel = index

    answers = iter(["Rating: 4", "Rating: 2", "unsure", "Rating: 5"])
    judged: list[str] = []

    def judge(image, prompt_text):
        judged.append(prompt_text)
        return next(answers)

    def attribute_judge(images: torch.Tensor, recs) -> dict[str, float]:
        assert images.dtype == torch.uint8
        assert images.shape == (n, 3, 32, 32)
        assert [r.prompt for r in recs] == [f"t{i}" for i in range(n)]
        return {"accuracy": 0.5}

    scorer = LookupScorer(torch.eye(n), torch.eye(n), over=2)
    out = tmp_path / "out" / "metrics.json"
    metrics = evaluate_generation(
        generated,
        records,
        out,
        reference_images="records",
        fid=FID(TinyFeatures()),
        clip_scorers={"lookup": scorer},
        judge=judge,
        judge_limit=4,
        attribute_judge=attribute_judge,
        batch_size=4,
        extra={"model": "tiny"},
    )
    payload = json.loads(out.read_text())
    assert payload["metrics"] == pytest.approx(metrics)
    expected_keys = {
        "n_images",
        "n_prompts_skipped_empty",
        "fid",
        "fid/n_real",
        "fid/n_fake",
        "clip_score/lookup",
        "clip_score/lookup/se",
        "clip_score/lookup/n_prompts_over_context",
        "clip_score/lookup/n_pairs_clamped",
        "judge/mean",
        "judge/n",
        "judge/n_rated",
        "judge/n_unparseable",
        "attributes/accuracy",
    }
    assert set(metrics) == expected_keys
    assert (metrics["n_images"], metrics["n_prompts_skipped_empty"]) == (6, 1)
    assert (metrics["fid/n_real"], metrics["fid/n_fake"]) == (6, 6)
    assert metrics["clip_score/lookup"] == pytest.approx(100.0)
    assert metrics["clip_score/lookup/se"] == pytest.approx(0.0, abs=1e-9)  # every pair scores 100: no spread
    assert metrics["clip_score/lookup/n_prompts_over_context"] == 2
    assert (metrics["judge/n"], metrics["judge/n_rated"], metrics["judge/n_unparseable"]) == (4, 3, 1)
    assert metrics["judge/mean"] == pytest.approx(11 / 3)
    assert metrics["attributes/accuracy"] == 0.5
    chosen = seeded_subset(n, 4, 0)
    assert judged == [JUDGE_PROMPT.format(caption=f"t{i}") for i in chosen]
    assert [a["image_id"] for a in payload["judge_answers"]] == chosen
    assert payload["judge_answers"][2] == {"image_id": chosen[2], "answer": "unsure", "rating": None}
    assert payload["prompt_set"]["column"] == "caption"
    assert payload["model"] == "tiny"

    # FID used the reference files, resized to the generated 32x32
    direct = FID(TinyFeatures())
    direct.update(load_reference_images([r.image_path for r in records], (32, 32)), real=True)
    direct.update(generated, real=False)
    assert metrics["fid"] == pytest.approx(direct.compute(), rel=1e-9)


def test_evaluate_generation_needs_reference_statistics():
    records = [PromptRecord(i, f"t{i}", None) for i in range(3)]
    with pytest.raises(ValueError, match="reference"):
        evaluate_generation(solid_images([0, 1, 2]), records, fid=FID(TinyFeatures()))
    with pytest.raises(ValueError, match="no reference image path"):
        evaluate_generation(solid_images([0, 1, 2]), records, fid=FID(TinyFeatures()), reference_images="records")
    with pytest.raises(ValueError, match="3 generated images but 2"):
        evaluate_generation(solid_images([0, 1, 2]), records[:2])
