"""Reduced-scale JPEG decoding (``Image.draft``) in the loader: asked for from the transform's resize target, never
below what the transform needs, and giving nearly the same tensors as a full decode."""

from __future__ import annotations

import functools
import io
import json
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from datamodules.wds_stages import DecodeImage, SkipStats, decode_image, draft_request

STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def scene_jpeg() -> bytes:
    """A 384-px tiny-world scene (hard shape edges, stripes) with mild pixel noise, as a q95 JPEG."""
    from benchmarks.loader import scene_config
    from datamodules.tiny_world.scene import render_scene, sample_scene

    rng = np.random.default_rng(0)
    cfg = replace(scene_config(384), pixel_noise_sigma=0.0)  # the world's noise bank at 384 px takes seconds
    img = render_scene(sample_scene(rng, cfg, n_objects=3), rng, cfg)
    arr = np.clip(np.asarray(img, np.float32) + rng.normal(0, 4, (384, 384, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_draft_request_follows_the_transforms_first_resize():
    assert draft_request(open_clip.image_transform(112, is_train=False)) == (112, 112)  # Resize(112), CenterCrop
    # RandomResizedCrop(112, scale=(0.9, 1), ratio=(3/4, 4/3)): shorter side >= 112 / sqrt(0.9 * 0.75) = 136.3
    assert draft_request(open_clip.image_transform(112, is_train=True)) == (137, 137)
    assert draft_request(open_clip.image_transform(224, is_train=True)) == (273, 273)
    assert draft_request(open_clip.image_transform(112, is_train=False, resize_mode="squash")) == (112, 112)
    assert draft_request(T.Compose([T.Resize((100, 50)), T.ToTensor()])) == (50, 100)  # (h, w) -> (w, h)
    assert draft_request(v2.Compose([v2.Resize(64), v2.ToImage()])) == (64, 64)
    assert draft_request(T.Compose([T.RandomResizedCrop(112)])) == (458, 458)  # torchvision's scale=(0.08, 1)
    # unknown or order-sensitive first steps: full decode
    assert draft_request(open_clip.image_transform(112, is_train=False, resize_mode="longest")) is None
    assert draft_request(T.Compose([T.CenterCrop(112), T.Resize(112)])) is None
    assert draft_request(T.Compose([T.ToTensor(), T.Resize(112)])) is None
    assert draft_request(lambda img: img) is None
    assert draft_request(None) is None
    # the caption-mix stream's per-sample seeding wraps the transform in a partial
    tf = open_clip.image_transform(112, is_train=True)
    assert draft_request(functools.partial(lambda fn, x: fn(x), tf)) == (137, 137)
    other = T.Compose([T.Resize(50)])
    assert draft_request(functools.partial(lambda a, b, x: a(b(x)), tf, other)) is None


@pytest.mark.parametrize("train", [False, True], ids=["resize_centercrop", "full_frame_random_resized_crop"])
def test_drafted_decode_gives_nearly_the_full_decode_tensor(train, scene_jpeg):
    if train:  # a crop that is the whole frame, so both decodes see the same crop; k = 1
        tf = T.Compose([T.RandomResizedCrop(112, scale=(1.0, 1.0), ratio=(1.0, 1.0), antialias=True), T.ToTensor()])
    else:
        tf = open_clip.image_transform(112, is_train=False)
    request = draft_request(tf)
    drafted = decode_image(scene_jpeg, draft=request)
    assert drafted.size == (192, 192)  # 1/2 scale: 1/4 would give 96 < 112
    full, small = tf(decode_image(scene_jpeg)), tf(drafted)
    diff = (full - small).abs() * (1.0 if train else STD)  # in [0, 1] pixel units
    assert diff.mean() < 0.01
    assert diff.flatten().quantile(0.99) < 0.05
    assert diff.max() < 0.15


@pytest.mark.parametrize("stored", [(384, 384), (384, 600), (1000, 300), (277, 277)])
def test_random_resized_crops_of_a_drafted_image_never_upsample(stored):
    """Every crop open_clip's RandomResizedCrop can draw from the drafted image is at least 112 px each way."""
    buf = io.BytesIO()
    Image.new("RGB", stored, (90, 120, 150)).save(buf, format="JPEG")
    tf = open_clip.image_transform(112, is_train=True)
    img = decode_image(buf.getvalue(), draft=draft_request(tf))
    rrc = tf.transforms[0]
    torch.manual_seed(0)
    crops = [rrc.get_params(img, rrc.scale, rrc.ratio) for _ in range(400)]
    assert min(min(h, w) for _, _, h, w in crops) >= 112
    # the analytic bound the request is built on: the smallest crop of the smallest allowed image
    side = draft_request(tf)[0]
    assert min(side * np.sqrt(0.9 * 0.75), side * np.sqrt(0.9 / (4 / 3))) >= 112
    assert img.size[0] < stored[0] or min(stored) < 2 * 137  # it was reduced whenever it could be


def test_draft_is_not_used_when_it_would_undershoot(scene_jpeg):
    assert decode_image(scene_jpeg, draft=(224, 224)).size == (384, 384)  # 384 // 224 = 1: no reduction
    assert decode_image(scene_jpeg, draft=(137, 137)).size == (192, 192)
    assert decode_image(scene_jpeg, draft=(96, 96)).size == (96, 96)  # exactly enough
    assert decode_image(scene_jpeg, draft=(97, 97)).size == (192, 192)  # 96 would undershoot
    png = io.BytesIO()
    Image.open(io.BytesIO(scene_jpeg)).save(png, format="PNG")
    assert decode_image(png.getvalue(), draft=(50, 50)).size == (384, 384)  # only JPEG has DCT scaling


class Recording(T.Compose):
    """A Compose that records the size of the images it is given."""

    def __init__(self, steps):
        super().__init__(steps)
        self.seen: list[tuple[int, int]] = []

    def __call__(self, img):
        self.seen.append(img.size)
        return super().__call__(img)


def _decode_stage(transform, data: bytes, **kw) -> dict:
    stage = DecodeImage(transform, SkipStats(), **kw)
    return next(iter(stage([{"url": "u", "key": "k", "image_bytes": data}])))


def test_decode_stage_infers_the_draft_from_the_transform(scene_jpeg):
    small = Recording([T.Resize(112), T.CenterCrop(112)])
    _decode_stage(small, scene_jpeg)
    large = Recording([T.Resize(224), T.CenterCrop(224)])
    _decode_stage(large, scene_jpeg)
    off = Recording([T.Resize(112), T.CenterCrop(112)])
    _decode_stage(off, scene_jpeg, draft=False)
    assert (small.seen, large.seen, off.seen) == ([(192, 192)], [(384, 384)], [(384, 384)])
    explicit = Recording([T.CenterCrop(10)])
    _decode_stage(explicit, scene_jpeg, draft=(48, 48))
    assert explicit.seen == [(48, 48)]


def test_truncated_jpeg_is_refused_with_and_without_draft(scene_jpeg):
    cut = scene_jpeg[: len(scene_jpeg) * 7 // 10]
    for draft in (None, (112, 112)):
        with pytest.raises(OSError, match="truncated"):
            decode_image(cut, draft=draft)


def test_loader_benchmark_generates_larger_stored_images_and_runs_the_ab(tmp_path, capsys):
    from benchmarks.loader import FullDecode, default_shards, main

    world = tmp_path / "world"
    argv = ["--world-dir", str(world), "--stored-size", "96", "--world-samples", "64", "--shard-size", "32"]
    argv += ["--workers", "0", "--batch-size", "16", "--samples", "32", "--repeats", "1", "--image-size", "32"]
    argv += ["--warmup-batches", "0", "--shuffle-initial", "8", "--shuffle-buffer", "16", "--full-decode"]
    result = main(argv)
    assert result["settings"]["stored"] == [96, 96]
    assert result["settings"]["full_decode"] is True
    assert result["sizes"][32]["runs"]["ours"][0]["shapes"]["image"] == [16, 3, 32, 32]
    assert json.loads((world / "world.json").read_text())["config"]["scene"]["image_size"] == 96
    assert "(ours: full-size decode)" in capsys.readouterr().out
    assert default_shards(world, 64, 32, stored_size=96)[1].startswith("reused")
    with pytest.raises(ValueError, match="96-px images, not 64"):
        default_shards(world, 64, 32, stored_size=64)
    tf = open_clip.image_transform(32, is_train=True)
    assert draft_request(tf) is not None
    assert draft_request(FullDecode(tf)) is None
