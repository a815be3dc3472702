"""ClipModule: the CLIPA schedule in samples, lr per 256 scaled by the global batch, stage-2 init with interpolated
position embeddings, safe checkpoint loading, and the open_clip export round trip."""

from __future__ import annotations

import json
import math
import pickle

import lightning as L
import open_clip
import pytest
import torch
from conftest import cpu_trainer, write_shards

from datamodules.caption_mix import CaptionMixDataModule
from experiments.export_clip import export_clip
from lightning_modules.clip import ClipModule, cosine_with_warmup
from lightning_modules.components.clip_model import build_clip, load_clip_weights, read_state_dict


def tiny_cfg(image_size: int = 32, ctx: int = 16) -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": 8,
            "width": 32,
            "layers": 1,
            "head_width": 16,
            "no_ln_pre": True,
            "pool_type": "avg",
            "final_ln_after_pool": True,
        },
        "text_cfg": {
            "context_length": ctx,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "no_causal_mask": True,
            "pool_type": "last",
        },
    }


def fit(module: ClipModule, shards, batch_size: int, max_steps: int = -1, root=None) -> L.Trainer:
    dm = CaptionMixDataModule(
        train_shards=str(shards), batch_size=batch_size, sources={"original": "txt"}, num_workers=0, shuffle_buffer=1
    )
    trainer = cpu_trainer(max_steps=max_steps, default_root_dir=root)
    trainer.fit(module, datamodule=dm)
    return trainer


def test_cosine_with_warmup_shape():
    lrs = [cosine_with_warmup(s, 10, 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # noqa: PT018 - one schedule
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5)  # half-way through the cosine
    assert lrs[110] == pytest.approx(0.0, abs=1e-12) and lrs[119] == pytest.approx(0.0, abs=1e-12)  # noqa: PT018
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_lr_per_256_and_sample_schedule(tmp_path):
    """Peak lr = lr_per_256 x global batch / 256; warm-up and length in samples become steps of this batch."""
    write_shards(tmp_path / "web", [40, 40], image_size=32)
    module = ClipModule(tiny_cfg(), lr_per_256=1e-3, weight_decay=0.2, warmup_samples=24, total_samples=64)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    dm = CaptionMixDataModule(
        train_shards=str(tmp_path / "web"), batch_size=8, sources={"original": "txt"}, num_workers=0
    )
    trainer = cpu_trainer(callbacks=[Spy()], max_epochs=5)
    trainer.fit(module, datamodule=dm)
    peak = 1e-3 * 8 / 256
    assert trainer.global_step == 8  # ceil(64 samples / 8), derived because max_steps was left at -1
    assert len(seen) == 8
    assert seen[2] == pytest.approx(peak)  # 24 samples = 3 warm-up steps; the third reaches the peak
    assert seen[0] == pytest.approx(peak / 3)
    assert seen[5] == pytest.approx(peak * cosine_with_warmup(5, 3, 8))
    opt = trainer.optimizers[0]
    assert opt.defaults["betas"] == (0.9, 0.999)
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(module.model.text_projection) in decay  # matrices decay ...
    assert id(module.model.logit_scale) not in decay  # ... the temperature and gains do not
    assert opt.param_groups[0]["weight_decay"] == 0.2 and opt.param_groups[1]["weight_decay"] == 0.0  # noqa: PT018


def test_weight_decay_groups_survive_flattened_parameters(monkeypatch):
    """Under FSDP (use_orig_params) configure_optimizers sees flat 1-D shards under FSDP-prefixed names: the decay
    groups must still be the ones of the unwrapped model (decided at construction), not "everything is 1-D"."""
    module = ClipModule(tiny_cfg(), lr=1e-3, weight_decay=0.2, total_samples=64)
    module.trainer = None
    shapes = {n: p.ndim for n, p in module.model.named_parameters()}
    flat = [
        (f"_fsdp_wrapped_module.{n}", torch.nn.Parameter(p.detach().flatten()))
        for n, p in module.model.named_parameters()
    ]
    monkeypatch.setattr(module.model, "named_parameters", lambda *a, **k: iter(flat))
    monkeypatch.setattr(ClipModule, "global_batch_size", lambda self: 8)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {id(p): n.removeprefix("_fsdp_wrapped_module.") for n, p in flat}
    decayed_names = {names[i] for i in decayed}
    assert "text_projection" in decayed_names
    assert decayed_names == {n for n, d in shapes.items() if d >= 2 and "ln" not in n and "bias" not in n} - {
        "logit_scale"
    }


def test_lr_arguments_are_exclusive():
    with pytest.raises(ValueError, match="exactly one of lr"):
        ClipModule(tiny_cfg(), weight_decay=0.1)
    with pytest.raises(ValueError, match="exactly one of lr"):
        ClipModule(tiny_cfg(), lr=1e-3, lr_per_256=1e-3, weight_decay=0.1)


def test_stage2_init_from_stage1_interpolates_position_embeddings(tmp_path):
    """CLIPA: stage 2 (64 px) starts from stage 1's (32 px) Lightning checkpoint; every weight carries over and
    the 4x4 position grid is resized to 8x8 with open_clip's bicubic interpolation."""
    torch.manual_seed(0)
    write_shards(tmp_path / "web", [24], image_size=32)
    stage1 = ClipModule(tiny_cfg(32), image_size=32, lr=1e-3, weight_decay=0.1)
    trainer = fit(stage1, tmp_path / "web", 8, max_steps=2)
    ckpt = tmp_path / "stage1.ckpt"
    trainer.save_checkpoint(ckpt)

    stage2 = ClipModule(tiny_cfg(32), image_size=64, lr=1e-3, weight_decay=0.1, init_from=str(ckpt))
    assert stage2.model.visual.image_size == (64, 64)
    old, new = stage1.model.state_dict(), stage2.model.state_dict()
    assert old["visual.positional_embedding"].shape == (1 + 16, 32)
    assert new["visual.positional_embedding"].shape == (1 + 64, 32)
    for k, v in old.items():
        if k != "visual.positional_embedding":
            torch.testing.assert_close(new[k], v, msg=k)
    # the class-token row is kept, the grid is a smooth upsampling of the old one (its 2x2 means ~ the old grid)
    torch.testing.assert_close(new["visual.positional_embedding"][0], old["visual.positional_embedding"][0])
    grid_new = new["visual.positional_embedding"][1:].reshape(8, 8, 32)
    grid_old = old["visual.positional_embedding"][1:].reshape(4, 4, 32)
    pooled = grid_new.reshape(4, 2, 4, 2, 32).mean((1, 3))
    assert torch.corrcoef(torch.stack([pooled.flatten(), grid_old.flatten()]))[0, 1] > 0.9
    image = torch.randn(2, 3, 64, 64)
    assert stage2.model.encode_image(image).shape == (2, 32)
    # and a checkpoint of a different architecture is refused with the path in the message
    other = tiny_cfg(32)
    other["text_cfg"]["width"] = 48
    with pytest.raises(ValueError, match="stage1.ckpt"):
        ClipModule(other, lr=1e-3, weight_decay=0.1, init_from=str(ckpt))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoints_are_loaded_safely(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_state_dict(tmp_path / "missing.ckpt")


def test_open_clip_checkpoint_and_safetensors_load(tmp_path):
    """init_from also takes plain open_clip checkpoints (state_dict, DDP 'module.' prefix) and safetensors."""
    from safetensors.torch import save_file

    src = build_clip(tiny_cfg()).model
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "oc.pt")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "oc.safetensors"))
    for name in ("oc.pt", "oc.safetensors"):
        dst = build_clip(tiny_cfg()).model
        load_clip_weights(dst, tmp_path / name)
        for k, v in src.state_dict().items():
            torch.testing.assert_close(dst.state_dict()[k], v)


def test_export_round_trip(tmp_path):
    """export-clip writes a folder that open_clip itself loads, giving the LightningModule's embeddings."""
    torch.manual_seed(0)
    write_shards(tmp_path / "web", [24], image_size=32)
    module = ClipModule(tiny_cfg(), context_length=16, lr=1e-3, weight_decay=0.1)
    trainer = fit(module, tmp_path / "web", 8, max_steps=2)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export_clip(ckpt, tmp_path / "export", name="tiny-recap-test")
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["context_length"] == 16

    module.eval()
    images = torch.randn(3, 3, 32, 32)
    texts = ["a red star on the left", "two circles", "IMG_2031.jpg"]
    with torch.no_grad():
        want_img = module.encode_images(images)
        want_txt = module.encode_texts(texts)

    # 1) open_clip's local-dir loader (config + weights + tokenizer from the folder)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    with torch.no_grad():
        got_img = model.encode_image(images, normalize=True)
        got_txt = model.encode_text(tokenizer(texts), normalize=True)
    torch.testing.assert_close(got_img, want_img)
    torch.testing.assert_close(got_txt, want_txt)
    # 2) a registered config name + pretrained=PATH
    open_clip.add_model_config(out / "tiny-recap-test.json")
    model2, _, _ = open_clip.create_model_and_transforms(
        "tiny-recap-test", pretrained=str(out / "open_clip_model.safetensors")
    )
    model2.eval()
    with torch.no_grad():
        torch.testing.assert_close(model2.encode_image(images, normalize=True), want_img)
    assert math.isclose(float(model2.logit_scale), float(module.model.logit_scale))


def test_export_refuses_a_non_clip_checkpoint(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="no ClipModule hyper_parameters"):
        export_clip(tmp_path / "x.ckpt", tmp_path / "out")


def _loss_and_grads(module: ClipModule, images: torch.Tensor, texts: torch.Tensor):
    module.zero_grad()
    out = module(images, texts)
    loss = module.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = ClipModule(tiny_cfg(), lr=1e-3)
    ckpt = ClipModule(tiny_cfg(), lr=1e-3, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.model.visual.transformer.grad_checkpointing
    assert ckpt.model.transformer.grad_checkpointing
    assert not plain.model.visual.transformer.grad_checkpointing
    images, texts = torch.randn(6, 3, 32, 32), torch.randint(1, 1000, (6, 16))
    loss_a, grads_a = _loss_and_grads(plain, images, texts)
    loss_b, grads_b = _loss_and_grads(ckpt, images, texts)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], msg=k)


def test_bf16_mixed_precision_trains(tmp_path):
    write_shards(tmp_path / "web", [32], image_size=32)
    module = ClipModule(tiny_cfg(), lr=1e-3, weight_decay=0.1)
    before = module.model.text_projection.detach().clone()
    dm = CaptionMixDataModule(
        train_shards=str(tmp_path / "web"), batch_size=8, sources={"original": "txt"}, num_workers=0
    )
    trainer = cpu_trainer(precision="bf16-mixed", max_steps=3)
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert module.model.text_projection.dtype == torch.float32  # mixed: fp32 master weights
    assert not torch.equal(module.model.text_projection, before)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """compile=True compiles the forward only: same outputs, same state-dict keys (checkpoints stay portable)."""
    torch.manual_seed(0)
    eager = ClipModule(tiny_cfg(), lr=1e-3)
    compiled = ClipModule(tiny_cfg(), lr=1e-3, compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 16))
    with torch.no_grad():
        a, b = eager(images, texts), compiled(images, texts)
    torch.testing.assert_close(a["image_features"], b["image_features"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["text_features"], b["text_features"], rtol=1e-4, atol=1e-5)


def test_named_table2_size_with_a_bert_tokenizer_folder(tmp_path):
    """model: recap-clip:S-16:small builds the paper's S/16 + small text (HTxt style, ctx 128, vocab 32,000); the BERT
    tokenizer is a config choice: here a local folder, as a cached bert-base-uncased would be on a real run."""
    from transformers import BertTokenizer

    words = ["a", "red", "star", "on", "the", "left", "two", "blue", "circles"]
    BertTokenizer(
        vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    ).save_pretrained(tmp_path / "bert")
    module = ClipModule("recap-clip:S-16:small", image_size=32, tokenizer=str(tmp_path / "bert"), lr=1e-3)
    assert module.context_length == 128
    assert module.model.token_embedding.num_embeddings == 32000
    assert module.model.visual.pool_type == "avg"
    assert module.model.attn_mask is None  # no_causal_mask: a bidirectional text tower
    tokens = module.data_transforms("fit").text("a red star on the left")
    assert tokens.shape == (128,)
    assert tokens[:7].tolist() == [2, 5, 6, 7, 8, 9, 10]  # [CLS] a red star on the left; [SEP] stripped
    assert int(tokens[7:].abs().sum()) == 0
    with torch.no_grad():
        feats = module.encode_texts(["two blue circles", "a red star"])
        img = module.encode_images(torch.randn(2, 3, 32, 32))
    assert feats.shape == img.shape == (2, 384)


def _tower_cfg(family: str) -> dict:
    """A tiny config of each vision tower family open_clip builds (text tower: tiny_cfg's)."""
    cfg = tiny_cfg()
    if family == "modified_resnet":  # open_clip's RN50 family: layers as a list, attention pool over image_size // 32
        cfg["vision_cfg"] = {"layers": [1, 1, 1, 1], "width": 8, "head_width": 64}
    elif family == "timm":
        cfg["vision_cfg"] = {"timm_model_name": "test_convnext", "timm_model_pretrained": False, "timm_pool": "avg"}
    return cfg


@pytest.mark.parametrize("family", ["vit", "modified_resnet", "timm"])
def test_every_tower_family_goes_through_both_clipa_stages(family, tmp_path):
    """Stage 1 at one size, stage 2 at double the size initialised from stage 1's checkpoint: every weight carries
    over, a grid of position embeddings (ViT: visual.positional_embedding; ModifiedResNet: the attention pool's
    [1 + grid**2, width]) is resized like open_clip's resize_pos_embed (class row kept, grid upsampled)."""
    torch.manual_seed(0)
    stage1 = ClipModule(_tower_cfg(family), image_size=64, lr=1e-3)
    ckpt = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": dict(stage1.hparams)}, ckpt)  # as Lightning
    stage2 = ClipModule(_tower_cfg(family), image_size=128, lr=1e-3, init_from=str(ckpt))
    old, new = stage1.model.state_dict(), stage2.model.state_dict()
    key = {"vit": "visual.positional_embedding", "modified_resnet": "visual.attnpool.positional_embedding"}.get(family)
    for k, v in old.items():
        if k != key:
            torch.testing.assert_close(new[k], v, msg=k)
    if key is not None:
        old_grid, new_grid = (8, 16) if family == "vit" else (2, 4)
        width = old[key].shape[1]
        assert old[key].shape == (1 + old_grid**2, width)
        assert new[key].shape == (1 + new_grid**2, width)
        torch.testing.assert_close(new[key][0], old[key][0])  # the class-token row
        pooled = new[key][1:].reshape(old_grid, 2, old_grid, 2, width).mean((1, 3))
        assert torch.corrcoef(torch.stack([pooled.flatten(), old[key][1:].flatten()]))[0, 1] > 0.9
    with torch.no_grad():
        assert stage2.encode_images(torch.randn(2, 3, 128, 128)).shape == (2, 32)
