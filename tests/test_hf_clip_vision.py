"""open_clip ViT tower -> HF ``CLIPVisionModel(WithProjection)``: every hidden state, the image embedding and the
preprocessing match open_clip; towers HF cannot express are refused."""

from __future__ import annotations

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection

from experiments.export_clip import export_clip
from lightning_modules.components.hf_clip_vision import (
    convert_open_clip_visual_state_dict,
    hf_vision_config,
    open_clip_export_to_hf_vision,
    save_hf_vision,
)

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
PREPROCESS = {"size": [32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic"}


def tiny_cfg(**vision) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"].update(vision)
    return cfg


def random_clip(cfg: dict, seed: int = 0) -> open_clip.CLIP:
    """An open_clip CLIP with every parameter random (LayerNorms too: weights around 1, so no mapping bug hides)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            module, _, kind = name.rpartition(".")
            if module.rpartition(".")[2].startswith("ln") and kind == "weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name != "visual.positional_embedding" or p.requires_grad:  # sin_cos_2d tables stay fixed
                p.copy_(0.3 * torch.randn_like(p))
    return model


def write_export(model: open_clip.CLIP, cfg: dict, out, preprocess=PREPROCESS, weights="open_clip_model.safetensors"):
    """The folder experiments/export_clip.py writes: open_clip_config.json + the whole model's weights."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(tensors, str(out / weights), metadata={"format": "pt"})
    else:
        torch.save(tensors, out / weights)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    return out


def open_clip_hidden_states(model: open_clip.CLIP, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The input of the first residual block (after ln_pre) and every block's output, batch first (open_clip's
    Transformer is batch_first by default; checked)."""
    blocks = model.visual.transformer.resblocks
    assert model.visual.transformer.batch_first
    states: list[torch.Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda _m, args: states.append(args[0]))]
    hooks += [b.register_forward_hook(lambda _m, _a, out: states.append(out)) for b in blocks]
    try:
        with torch.no_grad():
            model.encode_image(pixels)
    finally:
        for h in hooks:
            h.remove()
    return states


def assert_hidden_states_match(hf_out, states: list[torch.Tensor]) -> None:
    assert len(hf_out.hidden_states) == len(states)
    for i, (got, want) in enumerate(zip(hf_out.hidden_states, states, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, i=i: f"hidden_states[{i}]: {m}")


VARIANTS = {
    "gelu": tiny_cfg(),
    "quick_gelu": {**tiny_cfg(), "quick_gelu": True},
    # eps via norm_kwargs, a fixed sin-cos table, a non-integer mlp_ratio, LN after (token) pooling
    "options": tiny_cfg(
        norm_kwargs={"eps": 1e-3}, pos_embed_type="sin_cos_2d", mlp_ratio=2.5, final_ln_after_pool=True
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hidden_states_and_image_embeds_match_open_clip(tmp_path, variant):
    cfg = VARIANTS[variant]
    model = random_clip(cfg)
    export = write_export(model, cfg, tmp_path / "export")
    pixels = torch.randn(2, 3, 32, 32)
    states = open_clip_hidden_states(model, pixels)
    with torch.no_grad():
        want = model.encode_image(pixels)  # un-normalised

    hf, _ = open_clip_export_to_hf_vision(export, with_projection=True)
    assert isinstance(hf, CLIPVisionModelWithProjection)
    assert not hf.training
    assert hf.config.hidden_act == ("quick_gelu" if variant == "quick_gelu" else "gelu")
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
    assert_hidden_states_match(out, states)
    torch.testing.assert_close(out.image_embeds, want, atol=1e-5, rtol=1e-5)

    plain, _ = open_clip_export_to_hf_vision(export)
    assert type(plain) is CLIPVisionModel
    with torch.no_grad():
        assert_hidden_states_match(plain(pixel_values=pixels, output_hidden_states=True), states)


def test_a_wrong_mapping_is_caught(tmp_path):
    """The comparison is sharp: swapping q/k, the LayerNorms or dropping proj's transpose breaks it."""
    cfg = tiny_cfg()
    model = random_clip(cfg)
    pixels = torch.randn(2, 3, 32, 32)
    states = open_clip_hidden_states(model, pixels)
    config = hf_vision_config(cfg)
    visual = model.visual.state_dict()
    good = convert_open_clip_visual_state_dict(visual, config, with_projection=True)
    swaps = [("self_attn.q_proj.weight", "self_attn.k_proj.weight"), ("layer_norm1.weight", "layer_norm2.weight")]
    for a, b in swaps:
        bad = dict(good)
        pa, pb = f"vision_model.encoder.layers.1.{a}", f"vision_model.encoder.layers.1.{b}"
        bad[pa], bad[pb] = good[pb], good[pa]
        hf = CLIPVisionModelWithProjection(config).eval()
        hf.load_state_dict(bad, strict=True)
        with torch.no_grad():
            out = hf(pixel_values=pixels, output_hidden_states=True)
        with pytest.raises(AssertionError, match=r"hidden_states\[2\]"):
            assert_hidden_states_match(out, states)
    bad = dict(good, **{"visual_projection.weight": visual["proj"]})  # [48, 32] where the Linear wants [32, 48]
    with pytest.raises(RuntimeError, match="visual_projection"):
        CLIPVisionModelWithProjection(config).load_state_dict(bad, strict=True)
    with pytest.raises(ValueError, match="ls_1.gamma"):  # an extra open_clip weight is not silently dropped
        convert_open_clip_visual_state_dict({**visual, "transformer.resblocks.0.ls_1.gamma": torch.ones(48)}, config)


def test_save_round_trip_and_preprocessing(tmp_path):
    cfg = tiny_cfg()
    export = write_export(random_clip(cfg, seed=1), cfg, tmp_path / "export")
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")  # loads the folder
    oc_model.eval()
    hf, _ = open_clip_export_to_hf_vision(export, with_projection=True)
    out_dir = save_hf_vision(export, tmp_path / "hf")

    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True)
        for cls in (CLIPVisionModelWithProjection, CLIPVisionModel):  # a with-projection folder loads as either
            got = cls.from_pretrained(out_dir).eval()(pixel_values=pixels, output_hidden_states=True)
            for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(
            CLIPVisionModelWithProjection.from_pretrained(out_dir)(pixel_values=pixels).image_embeds,
            oc_model.encode_image(pixels),
            atol=1e-5,
            rtol=1e-5,
        )
    assert_hidden_states_match(want, open_clip_hidden_states(oc_model, pixels))

    processor = CLIPImageProcessor.from_pretrained(out_dir)
    assert list(processor.image_mean) == PREPROCESS["mean"]
    assert list(processor.image_std) == PREPROCESS["std"]
    rng = np.random.default_rng(0)
    # Exact where no resampling happens: the target size, and a taller image whose crop offset both libraries
    # agree on (HF crops at floor(excess / 2), torchvision at round(excess / 2): 13 -> 6 in both).
    for w, h in [(32, 32), (32, 45)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        got = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(got, oc_preprocess(image), atol=1e-5, rtol=0)
    # A 2x downscale: HF's torchvision backend resizes uint8 tensors, PIL rounds differently by at most one level.
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    got = processor(images=image, return_tensors="pt")["pixel_values"][0]
    one_level = 1 / 255 / min(PREPROCESS["std"])
    assert (got - oc_preprocess(image)).abs().max() <= one_level + 1e-5


def test_avg_pool_converts_hidden_states_but_refuses_the_projection(tmp_path):
    cfg = tiny_cfg(pool_type="avg")
    model = random_clip(cfg)
    export = write_export(model, cfg, tmp_path / "export", weights="open_clip_pytorch_model.bin")  # torch.save'd
    pixels = torch.randn(1, 3, 32, 32)
    hf, _ = open_clip_export_to_hf_vision(export)
    with torch.no_grad():
        assert_hidden_states_match(
            hf(pixel_values=pixels, output_hidden_states=True), open_clip_hidden_states(model, pixels)
        )
    with pytest.raises(ValueError, match=r"pool_type='avg'") as err:
        open_clip_export_to_hf_vision(export, with_projection=True)
    assert str(export) in str(err.value)
    assert type(CLIPVisionModel.from_pretrained(save_hf_vision(export, tmp_path / "hf", "auto"))) is CLIPVisionModel
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["CLIPVisionModel"]


@pytest.mark.parametrize(
    ("vision", "key"),
    [
        ({"no_ln_pre": True}, "no_ln_pre"),
        ({"layers": [1, 1, 1, 1]}, "layers"),
        ({"ls_init_value": 1e-5}, "ls_init_value"),
        ({"attentional_pool": True}, "attentional_pool"),
        ({"qk_norm": True}, "qk_norm"),
        ({"act_kwargs": {"approximate": "tanh"}}, "act_kwargs"),
        ({"norm_kwargs": {"elementwise_affine": False}}, "norm_kwargs"),
        ({"timm_model_name": "vit_tiny_patch16_224"}, "timm_model_name"),
        ({"image_size": [32, 48]}, "image_size"),
        ({"some_future_option": 1}, "some_future_option"),
    ],
)
def test_unsupported_towers_are_refused(tmp_path, vision, key):
    export = tmp_path / "export"
    export.mkdir()
    (export / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_cfg(**vision), "preprocess_cfg": {}}))
    with pytest.raises(ValueError, match=key) as err:
        open_clip_export_to_hf_vision(export)
    assert str(export) in str(err.value)


def test_longest_resize_mode_is_refused(tmp_path):
    cfg = tiny_cfg()
    export = write_export(random_clip(cfg), cfg, tmp_path / "export", preprocess={"resize_mode": "longest"})
    with pytest.raises(ValueError, match="resize_mode"):
        open_clip_export_to_hf_vision(export)


def test_export_clip_writes_the_hf_vision_folder(tmp_path):
    """``export_clip(..., hf_vision=DIR)`` on a (minimal) ClipModule checkpoint: hyper_parameters + model. weights."""
    cfg = tiny_cfg()
    model = random_clip(cfg)
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {"hyper_parameters": {"model": cfg}, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
        ckpt,
    )
    export_clip(ckpt, tmp_path / "export", hf_vision=tmp_path / "hf")
    hf = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(pixel_values=pixels).image_embeds, model.encode_image(pixels), atol=1e-5, rtol=1e-5
        )
    assert CLIPImageProcessor.from_pretrained(tmp_path / "hf").crop_size == {"height": 32, "width": 32}
