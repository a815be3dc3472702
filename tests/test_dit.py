"""Recap-DiT: sizes, the cached and uncached data paths (same loss, same caption draws), CFG dropout, EMA,
checkpoints without the frozen parts, sampling and predict grids, and both text-encoder kinds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import cpu_trainer

from datamodules.caption_mix import CaptionMixDataModule
from datamodules.latent_cache import LatentCacheDataModule, _CacheIndex, build_cache
from datamodules.tiny_world import WorldConfig, generate_world
from datamodules.tiny_world.recaption import truth_recaptions
from experiments.jobs.sidecars import build_sidecars
from lightning_modules.components.dit import FrozenCLIPText, build_dit, parse_dit_size
from lightning_modules.dit import DiTModule

TINY = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "patch_size": 4}


def save_open_clip_text(path: Path) -> Path:
    """A tiny random open_clip model in the export-clip layout (what the tiny world's web CLIP looks like)."""
    import open_clip
    from safetensors.torch import save_file

    vision = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
    cfg = {
        "embed_dim": 16,
        "vision_cfg": vision,
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"size": [16, 16]}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit")
    w = root / "world"
    generate_world(w, WorldConfig.tiny(seed=0, n_web=40, shard_size=20, workers=1))
    truth_recaptions(w, w / "recap")
    shards = sorted(str(p) for p in (w / "web").glob("*.tar"))
    build_sidecars(w / "recap", shards, w / "sidecars", progress=False)
    return {"root": root, "world": w, "text": save_open_clip_text(root / "text"), "shards": shards}


def make_module(world, **kw) -> DiTModule:
    args = dict(
        size=TINY,
        image_size=16,
        text_encoder=str(world["text"]),
        ema_decay=0.9,
        sampler="ddim",
        num_inference_steps=3,
        guidance_scale=2.0,
        prediction_type="v_prediction",
        beta_schedule="squaredcos_cap_v2",
        min_snr_gamma=5.0,
        lr=1e-3,
    )
    module = DiTModule(**(args | kw))
    module.configure_model()
    return module


def make_data(world, p: float, **kw) -> CaptionMixDataModule:
    return CaptionMixDataModule(
        "::".join(world["shards"]),
        batch_size=8,
        p_original=p,
        num_workers=0,
        sidecar_dir=str(world["world"] / "sidecars"),
        shuffle_buffer=1,
        shuffle_initial=1,
        persistent_workers=False,
        seed=3,
        **kw,
    )


def test_named_sizes_are_dits_shapes():
    assert parse_dit_size("DiT-B/4") == {
        "num_layers": 12,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "patch_size": 4,
    }
    with torch.device("meta"):
        model = build_dit("DiT-L/2", in_channels=4, sample_size=32, caption_channels=768)
    assert model.config.num_layers == 24
    assert model.config.num_attention_heads * model.config.attention_head_dim == 1024
    assert model.config.patch_size == 2
    assert model.config.out_channels == 4  # fixed variance: no learned sigma channels
    with pytest.raises(ValueError, match="unknown DiT size"):
        parse_dit_size("DiT-M/4")
    with pytest.raises(ValueError, match="not divisible"):
        build_dit("DiT-B/4", 4, 30, 768)


def test_cached_and_uncached_paths_give_the_same_draws_and_the_same_loss(world, tmp_path):
    module = make_module(world)
    data = make_data(world, p=0.5)
    data.setup("fit")
    data.image_transform = module.data_transforms("fit").image
    batch = next(iter(make_data(world, 0.5, image_transform=module.data_transforms("fit").image).train_dataloader()))
    totals = build_cache(
        module,
        world["shards"],
        tmp_path / "cache",
        sources={"original": "txt", "recaption": "sidecar:re_caption"},
        sidecar_dir=str(world["world"] / "sidecars"),
        batch_size=16,
        dtype="float32",
    )
    assert totals["shards"] == 2
    assert totals["samples"] == 40
    index = _CacheIndex(tmp_path / "cache")
    rows = [index.get(index.keys.index(k), s) for k, s in zip(batch["key"], batch["caption_source"], strict=True)]
    cached = {k: torch.stack(v) for k, v in zip(("latent", "text", "text_mask"), zip(*rows, strict=True), strict=True)}
    x0_u, text_u, mask_u = module.inputs(batch)
    x0_c, text_c, mask_c = module.inputs(cached)
    torch.manual_seed(0)
    noise, t, drop = module.draw(x0_u)
    drop[:2] = True  # some rows on the null text, some not
    loss_u = module.loss(x0_u, text_u, mask_u, noise, t, drop)
    loss_c = module.loss(x0_c, text_c, mask_c, noise, t, drop)
    torch.testing.assert_close(loss_c, loss_u, rtol=1e-5, atol=1e-6)
    assert set(batch["caption_source"]) == {"original", "recaption"}  # p = 0.5: both sources in one batch

    # the cached DataModule draws the same source per (seed, epoch, key) as the uncached one
    cdm = LatentCacheDataModule(str(tmp_path / "cache"), batch_size=8, p_original=0.5, seed=3)
    drawn = {k: s for b in cdm.train_dataloader() for k, s in zip(b["key"], b["caption_source"], strict=True)}
    uncached = {
        k: s
        for b in make_data(world, 0.5).train_dataloader()
        for k, s in zip(b["key"], b["caption_source"], strict=True)
    }
    assert len(drawn) == 40
    assert drawn == {k: uncached[k] for k in drawn}
    with pytest.raises(ValueError, match="made differently"):  # another text length must not reuse this cache
        build_cache(
            make_module(world, text_max_length=8),
            world["shards"],
            tmp_path / "cache",
            sources={"original": "txt", "recaption": "sidecar:re_caption"},
            sidecar_dir=str(world["world"] / "sidecars"),
            dtype="float32",
        )


def test_cfg_dropout_rate_is_as_configured_and_dropped_rows_get_the_null_text(world):
    module = make_module(world, cfg_dropout=0.1)
    torch.manual_seed(0)
    x0 = torch.zeros(20000, 1)
    _, _, drop = module.draw(x0)
    assert abs(drop.float().mean().item() - 0.1) < 0.01  # sd of the rate at n = 20000: 0.002
    assert not make_module(world, cfg_dropout=0.0).draw(x0)[2].any()
    text, mask = module.encode_text(["a red star", "a blue ring on a gray background"])
    d = torch.tensor([True, False])
    t2, m2 = module.drop_text(text, mask, d)
    n = module.null_text.shape[1]
    torch.testing.assert_close(t2[0, :n], module.null_text[0])
    assert m2[0].sum() == module.null_mask.sum()
    torch.testing.assert_close(t2[1, : text.shape[1]], text[1])
    with pytest.raises(ValueError, match="cfg_dropout"):
        DiTModule(size=TINY, image_size=16, text_encoder=str(world["text"]), cfg_dropout=1.5)


def test_training_updates_ema_and_checkpoints_hold_no_frozen_weights(world, tmp_path):
    module = make_module(world)
    data = make_data(world, 0.0)
    data.image_transform = module.data_transforms("fit").image
    before = [p.detach().clone() for p in module.dit.parameters()]
    trainer = cpu_trainer(max_steps=4, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    ema = [p.detach().clone() for p in module.ema.shadow_params]
    now = list(module.dit.parameters())
    assert module.ema.optimization_step == 4
    assert any(not torch.equal(e, b) for e, b in zip(ema, before, strict=True))  # EMA moved from the init
    assert any(not torch.equal(e, p) for e, p in zip(ema, now, strict=True))  # and lags the live weights
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)  # our own file, inspected; the module loads with weights_only
    assert not [k for k in ckpt["state_dict"] if k.startswith(("text_encoder.", "codec."))]
    assert "ema" in ckpt
    back = DiTModule.load_from_checkpoint(path, weights_only=False)
    for a, b in zip(back.ema.shadow_params, ema, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(back.dit.parameters(), now, strict=True):
        torch.testing.assert_close(a, b)


def test_generate_is_seeded_uses_ema_and_predict_writes_a_grid(world, tmp_path):
    module = make_module(world, sample_dir=str(tmp_path / "samples"))
    with torch.no_grad():  # make the model's output depend on its weights (zero-initialised final layer)
        module.dit.proj_out.weight.normal_(0, 0.5)
    a = module.generate(["a red star", "a blue ring"], seed=1)
    assert a.dtype == torch.uint8
    assert a.shape == (2, 3, 16, 16)
    assert torch.equal(a, module.generate(["a red star", "a blue ring"], seed=1))
    assert not torch.equal(a, module.generate(["a red star", "a blue ring"], seed=2))
    assert not torch.equal(a, module.generate(["a red star", "a blue ring"], seed=1, use_ema=False))  # EMA != live
    out = module.predict_step({"prompt": ["a red star", "a green cross", "a cyan ring"]}, 0)
    assert out["images"].shape == (3, 3, 16, 16)
    grid = tmp_path / "samples/grid_r0_b00000.png"
    assert grid.exists()
    assert json.loads(grid.with_suffix(".json").read_text())[1] == "a green cross"


def test_hf_clip_text_encoder_path_masks_and_counts_truncation(world, tmp_path):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from experiments.tiny_llm import train_world_tokenizer

    train_world_tokenizer(world["world"], tmp_path / "tok", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    CLIPTextModel(cfg).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    enc = FrozenCLIPText(str(tmp_path / "hf"), max_length=10)
    assert enc.kind == "hf"
    emb, mask = enc(["red star", "a large blue circle in the center and a small green cross on the left side"])
    assert emb.shape == (2, 10, 32)
    assert mask[0].sum() < 10
    assert mask[1].sum() == 10
    assert enc.n_truncated == 1
    assert torch.all(emb[0, int(mask[0].sum()) :] == 0)  # padding positions carry nothing
    assert not any(p.requires_grad for p in enc.parameters())


def test_stated_truth_judges_only_what_the_prompt_asks():
    from datamodules.prompts import PromptRecord
    from experiments.dit_eval import stated_truth

    objects = json.dumps(
        [
            {"shape": "cross", "colour": "orange", "position": "left", "size": "large"},
            {"shape": "circle", "colour": "green", "position": "bottom", "size": "small"},
        ]
    )
    row = {"objects": objects, "background": json.dumps({"kind": "plain", "colours": ["beige"]})}
    short = PromptRecord(0, "A green circle below a large orange cross", None, row)
    assert stated_truth(short) == {"shape": "cross", "colour": "orange"}  # the main object, not the first mentioned
    shape_only = PromptRecord(1, "A large cross on the left side on a plain beige background", None, row)
    assert stated_truth(shape_only) == {"shape": "cross", "position": "left", "background": "plain"}


def test_fit_checkpoint_then_dit_eval_writes_metrics_for_both_prompt_sets(world, tmp_path):
    from experiments.dit_eval import main as dit_eval
    from lightning_modules.evaluation.judge import train_judge

    module = make_module(world)
    data = make_data(world, 0.0)
    data.image_transform = module.data_transforms("fit").image
    trainer = cpu_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    train_judge(world["world"], tmp_path / "judge", image_size=16, steps=5, batch_size=16, threads=1)
    prompts = world["world"] / "eval/t2i_prompts/prompts.parquet"
    results = dit_eval(
        [
            "--ckpt",
            str(tmp_path / "last.ckpt"),
            "--prompts",
            str(prompts),
            "--limit",
            "12",
            "--batch-size",
            "6",
            "--steps",
            "2",
            "--attribute-judge",
            str(tmp_path / "judge"),
            "--clip",
            f"tiny={world['text']}",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    for column in ("caption", "recaption"):
        m = results[column]
        assert m["n_images"] == 12
        assert m["fid"] >= 0
        assert 0 <= m["clip_score/tiny"] <= 100
        assert 0 <= m["attributes/shape"] <= 1  # every prompt names the main object's shape
        assert "attributes/chance/shape" in m
        saved = json.loads((tmp_path / "eval" / column / "metrics.json").read_text())
        assert saved["metrics"]["n_images"] == 12
        assert (tmp_path / "eval" / column / "grid.png").exists()
    assert re.search(r"^\| fid +\|", (tmp_path / "eval/results.md").read_text(), re.M)


def test_cache_benchmark_runs_both_paths(world):
    from benchmarks.dit_cache import main

    report = main(
        [
            "--preset",
            "tiny",
            "--world",
            str(world["world"]),
            "--text-encoder",
            str(world["text"]),
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--skip",
            "1",
        ]
    )
    assert report["cached_samples"] == 40
    assert report["uncached_s_per_step"] > 0
    assert report["cached_s_per_step"] > 0
    assert report["ratio_cached_over_uncached"] == report["uncached_s_per_step"] / report["cached_s_per_step"]
