"""The loader's per-sample limits as DataModule arguments (``min_image_size``, ``max_image_pixels``,
``max_caption_chars``, ``jpeg_draft``): a non-default value changes what is skipped and counted, in the main process,
in loader workers and in the DiT cache builder; nonsense values are refused naming the key; a resumed run refuses a
loader state made with other limits."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest
import torch
from conftest import img2dataset_key, jpeg_bytes
from PIL import Image
from torchvision import transforms as T

from datamodules.caption_mix import CaptionMixDataModule, DataTransforms
from datamodules.checks import ConfigError
from datamodules.wds_stages import SampleLimits
from experiments.validate import validate_config

CAPTION = "a caption"


class InputSize(T.Compose):
    """A torchvision Compose (so the loader can read its first Resize for draft decoding) that returns the size of
    the image it was given, as a tensor: what the decode stage handed the model's transform."""

    def __call__(self, img):
        super().__call__(img)
        return torch.tensor(img.size)


SIZE_OF_INPUT = InputSize([T.Resize(8), T.CenterCrop(8)])


def png_bytes(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, bytes, str]]) -> list[str]:
    """One img2dataset-layout shard of ``(image suffix, image bytes, caption)`` samples; returns their keys."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i, (suffix, image, caption) in enumerate(samples):
            key = img2dataset_key(0, i)
            keys.append(key)
            for name, data in ((f"{key}.{suffix}", image), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return keys


def make_dm(shard: Path, **kw) -> CaptionMixDataModule:
    args = dict(
        train_shards=str(shard),
        test_shards=str(shard),
        sources={"original": "txt"},
        batch_size=1,
        num_workers=0,
        image_transform=SIZE_OF_INPUT,
    )
    args.update(kw)
    return CaptionMixDataModule(**args)


def one_pass(batches) -> tuple[dict[str, dict], dict[str, int]]:
    """``{key: {"size": input size, "caption": caption}}`` and the summed skip counts of a pass over ``batches``."""
    samples, counts = {}, {}
    for batch in batches:
        for reason, n in batch["skipped"]["counts"].items():
            counts[reason] = counts.get(reason, 0) + n
        for i, key in enumerate(batch["key"]):
            samples[key] = {"size": tuple(batch["image"][i].tolist()), "caption": batch["caption"][i]}
    return samples, counts


# ------------------------------------------------------------------------------------------------ what is skipped
def test_min_image_size_decides_which_small_images_are_kept(tmp_path):
    shard = tmp_path / "00000.tar"
    small, big = write_shard(shard, [("png", png_bytes(12), CAPTION), ("png", png_bytes(32), CAPTION)])
    kept, counts = one_pass(make_dm(shard).test_dataloader())  # the default minimum, 8
    assert (set(kept), counts) == ({small, big}, {})
    for workers in (0, 1):  # in the main process and in a loader worker (the stream's copy carries the limits)
        kept, counts = one_pass(make_dm(shard, min_image_size=16, num_workers=workers).test_dataloader())
        assert (set(kept), counts) == ({big}, {"tiny_image": 1})
    kept, counts = one_pass(make_dm(shard, min_image_size=None).test_dataloader())
    assert set(kept) == {small, big}


def test_the_stream_pickled_for_spawned_workers_keeps_its_limits(tmp_path):
    shard = tmp_path / "00000.tar"
    small, big = write_shard(shard, [("png", png_bytes(12), CAPTION), ("png", png_bytes(32), CAPTION)])
    dm = make_dm(shard, min_image_size=16, max_caption_chars=50, jpeg_draft=False, max_image_pixels=5000)
    stream = pickle.loads(pickle.dumps(dm.test_dataloader().dataset))
    assert stream.settings.limits == SampleLimits(16, 5000, 50, False)
    kept, counts = one_pass(iter(stream))
    assert (set(kept), counts) == ({big}, {"tiny_image": 1})


def test_max_caption_chars_decides_which_long_captions_are_kept(tmp_path):
    shard = tmp_path / "00000.tar"
    jpg = jpeg_bytes(0, 32)
    long, short = write_shard(shard, [("jpg", jpg, "w" * 600), ("jpg", jpg, CAPTION)])  # skips after the last
    # batch of an evaluation pass are not reported (no batch carries them), so the skipped sample comes first
    kept, counts = one_pass(make_dm(shard).test_dataloader())  # the default cap, 10,000
    assert (set(kept), counts) == ({short, long}, {})
    assert kept[long]["caption"] == "w" * 600
    kept, counts = one_pass(make_dm(shard, max_caption_chars=500).test_dataloader())
    assert (set(kept), counts) == ({short}, {"caption_too_long": 1, "no_caption": 1})


def test_a_too_long_caption_falls_back_to_the_other_source(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        key = img2dataset_key(0, 0)
        meta = json.dumps({"org_caption": "short json caption"}).encode()
        for name, data in ((f"{key}.jpg", jpeg_bytes(1, 32)), (f"{key}.txt", b"t" * 600), (f"{key}.json", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dm = make_dm(
        shard, sources={"original": "txt", "recaption": "json:org_caption"}, p_original=1.0, max_caption_chars=500
    )
    kept, counts = one_pass(dm.test_dataloader())
    assert kept[key]["caption"] == "short json caption"
    assert counts == {"caption_too_long": 1, "fallback:original->recaption": 1}


def test_max_image_pixels_decides_which_large_images_are_kept(tmp_path):
    shard = tmp_path / "00000.tar"
    large, small = write_shard(shard, [("png", png_bytes(40), CAPTION), ("png", png_bytes(32), CAPTION)])
    kept, counts = one_pass(make_dm(shard).test_dataloader())
    assert (set(kept), counts) == ({small, large}, {})
    kept, counts = one_pass(make_dm(shard, max_image_pixels=1500).test_dataloader())  # 32^2 = 1024 < 1500 < 1600
    assert (set(kept), counts) == ({small}, {"oversized_image": 1})


def test_a_pixel_limit_above_pils_own_applies_and_null_leaves_pils(tmp_path, monkeypatch):
    """PIL warns above ``Image.MAX_IMAGE_PIXELS``; the configured limit replaces that check, so raising the limit
    takes effect (PIL's own error at twice its value stays); ``None`` falls back on PIL's warning as the limit."""
    shard = tmp_path / "00000.tar"
    large, small = write_shard(shard, [("png", png_bytes(40), CAPTION), ("png", png_bytes(30), CAPTION)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 30^2 = 900 under it, 40^2 = 1600 over it
    kept, counts = one_pass(make_dm(shard, max_image_pixels=1800).test_dataloader())
    assert (set(kept), counts) == ({small, large}, {})
    kept, counts = one_pass(make_dm(shard, max_image_pixels=None).test_dataloader())
    assert (set(kept), counts) == ({small}, {"oversized_image": 1})


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jpeg_draft_off_decodes_at_full_size(tmp_path, training):
    shard = tmp_path / "00000.tar"
    keys = write_shard(shard, [("jpg", jpeg_bytes(i, 64), CAPTION) for i in range(2)])
    transform = InputSize([T.Resize(16), T.CenterCrop(16)])

    def sizes(**kw) -> set[tuple[int, int]]:
        dm = make_dm(shard, image_transform=transform, train_num_samples=2, shuffle_buffer=0, **kw)
        loader = dm.train_dataloader() if training else dm.test_dataloader()
        kept, counts = one_pass(loader)
        assert (set(kept), counts) == (set(keys), {})
        return {s["size"] for s in kept.values()}

    assert sizes() == {(16, 16)}  # the default: libjpeg's 1/4 scale still gives Resize(16) 16 px
    assert sizes(jpeg_draft=False) == {(64, 64)}


# -------------------------------------------------------------------------------------------------------- validation
def _validate(tmp_path: Path, **limits) -> list[str]:
    shard = tmp_path / "00000.tar"
    if not shard.exists():
        write_shard(shard, [("jpg", jpeg_bytes(0, 32), CAPTION)])
    init = {"train_shards": str(shard), "sources": {"original": "txt"}, "batch_size": 2, **limits}
    return validate_config({"data": {"class_path": "datamodules.caption_mix.CaptionMixDataModule", "init_args": init}})


BAD = {
    "min_image_size_0": ({"min_image_size": 0}, "data.init_args.min_image_size = 0: must be >= 1"),
    "min_image_size_float": ({"min_image_size": 8.5}, "data.init_args.min_image_size = 8.5: must be an integer"),
    "caption_cap_0": ({"max_caption_chars": 0}, "data.init_args.max_caption_chars = 0: must be >= 1"),
    "caption_cap_negative": ({"max_caption_chars": -5}, "data.init_args.max_caption_chars = -5: must be >= 1"),
    "pixels_0": ({"max_image_pixels": 0}, "data.init_args.max_image_pixels = 0: must be >= 1"),
    "pixels_under_min_side_squared": (
        {"min_image_size": 16, "max_image_pixels": 255},
        "data.init_args.max_image_pixels = 255: must be >= min_image_size^2 = 256",
    ),
    "pixels_over_pils_refusal": (
        {"max_image_pixels": 2 * Image.MAX_IMAGE_PIXELS + 1},
        f"data.init_args.max_image_pixels = {2 * Image.MAX_IMAGE_PIXELS + 1}: must be <= {2 * Image.MAX_IMAGE_PIXELS}",
    ),
    "draft_not_bool": ({"jpeg_draft": "yes"}, "data.init_args.jpeg_draft = 'yes': must be true or false"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_nonsense_limits_are_refused_naming_the_key(tmp_path, name):
    limits, expected = BAD[name]
    lines = _validate(tmp_path, **limits)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"config error: {expected}"), lines
    key = expected.split(" = ")[0].rsplit(".", 1)[1]
    with pytest.raises(ConfigError) as exc:  # the constructor applies the same rules (direct Python use)
        make_dm(tmp_path / "00000.tar", **limits)
    assert exc.value.key == key


def test_sensible_and_switched_off_limits_pass(tmp_path):
    assert _validate(tmp_path) == []
    assert _validate(tmp_path, min_image_size=16, max_image_pixels=256, max_caption_chars=1, jpeg_draft=False) == []
    assert _validate(tmp_path, min_image_size=None, max_image_pixels=None, max_caption_chars=None) == []
    assert _validate(tmp_path, min_image_size=None, max_image_pixels=1) == []  # no minimum: nothing to square


def test_the_real_configs_state_the_limits_explicitly():
    import yaml

    configs = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    for name in ("clip/stage1.yaml", "clip/stage2.yaml", "dit/base.yaml"):
        init = yaml.safe_load((configs / name).read_text())["data"]["init_args"]
        assert {k: init.get(k) for k in SampleLimits().as_dict()} == SampleLimits().as_dict(), name


# ------------------------------------------------------------------------------------------------------------ resume
def _state(shards: dict, **kw) -> dict:
    loader = _resume_dm(shards, **kw).train_dataloader()
    list(itertools.islice(iter(loader), 2))
    return loader.state_dict()


def _resume_dm(shards: dict, **kw) -> CaptionMixDataModule:
    return conftest.make_dm(shards, **{"p_original": 0.5, **kw})


def test_a_loader_state_records_the_limits_and_refuses_other_ones(tiny_shards):
    state = _state(tiny_shards)
    assert {k: state[k] for k in SampleLimits().as_dict()} == SampleLimits().as_dict()
    _resume_dm(tiny_shards).train_dataloader().load_state_dict(state)  # same limits: accepted
    other = {"min_image_size": 16, "max_caption_chars": 500, "max_image_pixels": 10**6, "jpeg_draft": False}
    for key, value in other.items():
        was = SampleLimits().as_dict()[key]
        with pytest.raises(ValueError, match=rf"{key}: checkpoint {was!r}, now {value!r}"):
            _resume_dm(tiny_shards, **{key: value}).train_dataloader().load_state_dict(state)
    made_with_16 = _state(tiny_shards, min_image_size=16)
    with pytest.raises(ValueError, match="min_image_size: checkpoint 16, now 8"):
        _resume_dm(tiny_shards).train_dataloader().load_state_dict(made_with_16)


def test_a_state_without_the_limits_is_not_compared_on_them(tiny_shards):
    # LEGACY_LIMITS (the fixed limits of states written before they were recorded) is gone (issue 18): such a
    # state is compared on what it records, as one without the dedupe keys (test_loader_duplicates)
    state = {k: v for k, v in _state(tiny_shards).items() if k not in SampleLimits().as_dict()}
    _resume_dm(tiny_shards).train_dataloader().load_state_dict(state)
    _resume_dm(tiny_shards, max_image_pixels=10**6).train_dataloader().load_state_dict(state)
    _resume_dm(tiny_shards, min_image_size=16).train_dataloader().load_state_dict(state)


# --------------------------------------------------------------------------------------------------- the DiT cache
class StubDiT:
    """What ``build_cache`` uses of a ``DiTModule``: the image transform, the encoders and the signature's hparams."""

    hparams = SimpleNamespace(text_encoder="stub", vae=None, vae_subfolder=None, image_size=8)
    text_encoder = SimpleNamespace(max_length=2)

    def configure_model(self) -> None:
        pass

    def data_transforms(self, stage: str) -> DataTransforms:
        return DataTransforms(image=T.Compose([T.Resize(8), T.CenterCrop(8), T.PILToTensor()]))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(len(texts), 2, 3), torch.ones(len(texts), 2)


def test_the_dit_cache_builder_applies_and_records_the_limits(tmp_path):
    from safetensors import safe_open

    from datamodules.latent_cache import CACHE_CONFIG, build_cache

    shard = tmp_path / "00000.tar"
    small, big = write_shard(shard, [("png", png_bytes(12), CAPTION), ("png", png_bytes(32), CAPTION)])
    limits = SampleLimits(min_image_size=16)
    totals = build_cache(StubDiT(), str(shard), tmp_path / "cache", sources={"original": "txt"}, limits=limits)
    assert (totals["samples"], totals["skipped"]) == (1, 1)
    with safe_open(str(tmp_path / "cache" / "00000.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (json.loads(meta["keys"]), json.loads(meta["skipped"])) == ([big], {"tiny_image": 1})
    signature = json.loads((tmp_path / "cache" / CACHE_CONFIG).read_text())
    assert signature["sample_limits"] == limits.as_dict()
    with pytest.raises(ValueError, match="made differently.*sample_limits"):  # other limits: another cache
        build_cache(StubDiT(), str(shard), tmp_path / "cache", sources={"original": "txt"})
    # a cache written before the limits were recorded was made with the fixed values of that code
    del signature["sample_limits"]
    (tmp_path / "old" / CACHE_CONFIG).parent.mkdir()
    (tmp_path / "old" / CACHE_CONFIG).write_text(json.dumps(signature))
    with pytest.raises(ValueError, match="made differently.*sample_limits"):
        build_cache(StubDiT(), str(shard), tmp_path / "old", sources={"original": "txt"}, limits=limits)
    assert build_cache(StubDiT(), str(shard), tmp_path / "old", sources={"original": "txt"})["samples"] == 2
