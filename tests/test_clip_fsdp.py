"""Recap-CLIP under FSDP: ClipModule's ``nonscalar_logit_scale`` switch (open_clip's shape-[1] temperature, which torch
FSDP accepts where it refuses the default 0-dim one), and checkpoints across the two layouts: ``init_from`` both ways,
resume and ``--ckpt_path`` loading (``on_load_checkpoint``), and ``export-clip`` (always open_clip's default layout).

torch's FSDP runs here on CPU in one process (gloo), as in tests/test_multinode.py; Lightning's FSDPStrategy needs GPUs.
"""

from __future__ import annotations

import json
import math

import lightning as L
import open_clip
import pytest
import torch
import yaml
from conftest import cpu_trainer, write_shards
from test_clip import tiny_cfg
from test_configs import parser  # noqa: F401 - the module-scoped LightningCLI parser fixture
from test_multinode import CONFIGS, _classes, _resolved

from datamodules.caption_mix import CaptionMixDataModule
from datamodules.checks import ConfigError, RunContext
from experiments.export_clip import export_clip
from lightning_modules.clip import ClipModule
from lightning_modules.components.clip_model import read_state_dict, reshape_logit_params

BATCH = 8


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _dm(shards) -> CaptionMixDataModule:
    return CaptionMixDataModule(
        train_shards=str(shards),
        val_shards=str(shards),
        batch_size=BATCH,
        sources={"original": "txt"},
        num_workers=0,
        shuffle_buffer=1,
    )


def _trainer(max_steps: int, **kw) -> L.Trainer:
    return cpu_trainer(max_steps=max_steps, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=None, **kw)


def _module(nonscalar: bool, **kw) -> ClipModule:
    kw.setdefault("context_length", 16)
    return ClipModule(tiny_cfg(), lr=1e-3, weight_decay=0.1, train_augment=False, nonscalar_logit_scale=nonscalar, **kw)


def _fit(module: ClipModule, shards, max_steps: int, ckpt_path=None, save=None) -> list[float]:
    rec = RecordLosses()
    trainer = _trainer(max_steps, callbacks=[rec], log_every_n_steps=1)
    trainer.fit(module, datamodule=_dm(shards), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    if save is not None:
        trainer.save_checkpoint(save)
    return rec.losses


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        torch.testing.assert_close(sb[k].reshape(v.shape), v, rtol=0, atol=0, msg=k)


def _outputs(module: ClipModule, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    module.eval()
    with torch.no_grad():
        out = module(images, texts)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    return {"image": out["image_features"], "text": out["text_features"], "logits": logits}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A scalar (DDP-style) ClipModule trained 1 step and its Lightning checkpoint (with optimizer state)."""
    root = tmp_path_factory.mktemp("fsdp_clip")
    write_shards(root / "web", [32], image_size=32)
    torch.manual_seed(0)
    module = _module(False)
    _fit(module, root / "web", 1, save=root / "scalar.ckpt")
    return {"root": root, "shards": root / "web", "ckpt": root / "scalar.ckpt", "module": module}


# ---------------------------------------------------------------------------------------------------- the switch
def test_switch_applies_to_every_model_form(tmp_path):
    """Named sizes, config dicts and JSON paths all get a [1] logit_scale with the switch and [] without; a config
    dict may carry open_clip's key only if it agrees (checked at construction and by validate_config)."""
    with torch.device("meta"):  # a paper-size tower costs nothing on the meta device
        named = ClipModule("recap-clip:S-16:small:openai", lr=1e-3, nonscalar_logit_scale=True)
        named_default = ClipModule("recap-clip:S-16:small:openai", lr=1e-3)
    assert named.model.logit_scale.shape == (1,)
    assert named_default.model.logit_scale.shape == ()
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_cfg()))
    for model in (tiny_cfg(), str(tmp_path / "tiny.json"), {**tiny_cfg(), "nonscalar_logit_scale": True}):
        assert ClipModule(model, lr=1e-3, nonscalar_logit_scale=True).model.logit_scale.shape == (1,)
    assert ClipModule(tiny_cfg(), lr=1e-3).model.logit_scale.shape == ()
    assert ClipModule({**tiny_cfg(), "nonscalar_logit_scale": False}, lr=1e-3).model.logit_scale.shape == ()

    disagree = {**tiny_cfg(), "nonscalar_logit_scale": True}
    with pytest.raises(ValueError, match="model.init_args.nonscalar_logit_scale"):
        ClipModule(disagree, lr=1e-3)
    with pytest.raises(ConfigError, match="nonscalar_logit_scale"):
        ClipModule.validate_config({"model": disagree, "lr": 1e-3}, RunContext())
    ClipModule.validate_config({"model": disagree, "lr": 1e-3, "nonscalar_logit_scale": True}, RunContext())


def test_fsdp_overlay_sets_the_switch(parser):  # noqa: F811 - the imported fixture
    stack = [CONFIGS / "clip/stage1.yaml"]
    assert _resolved(parser, stack)["model"]["init_args"]["nonscalar_logit_scale"] is False
    fsdp = _resolved(parser, stack + [CONFIGS / "trainer/fsdp_clip.yaml"])
    assert fsdp["model"]["init_args"]["nonscalar_logit_scale"] is True


def test_nonscalar_trains_like_scalar(stage1, tmp_path):
    """Same weights, same batches: the [1] model's losses, logged temperature, clamp and updated weights are the
    scalar model's (the loss, the logging and the clamp at log(100) all take the [1] shape)."""
    scalar = _module(False)
    with torch.no_grad():
        scalar.model.logit_scale.fill_(4.7)  # above log(100): both must be clamped after the step
    torch.save(scalar.model.state_dict(), tmp_path / "init.pt")
    nonscalar = _module(True, init_from=str(tmp_path / "init.pt"))
    assert nonscalar.model.logit_scale.shape == (1,)
    _same_weights(scalar.model, nonscalar.model)

    results = {}
    for name, module in (("scalar", scalar), ("nonscalar", nonscalar)):
        rec = RecordLosses()
        trainer = _trainer(2, callbacks=[rec], log_every_n_steps=1)
        trainer.fit(module, datamodule=_dm(stage1["shards"]))
        results[name] = (rec.losses, trainer.callback_metrics["train/logit_scale"])
    assert len(results["scalar"][0]) == 2
    torch.testing.assert_close(results["nonscalar"][0], results["scalar"][0], rtol=1e-6, atol=1e-7)
    logged = results["nonscalar"][1]
    assert logged.shape == ()
    torch.testing.assert_close(logged, results["scalar"][1])
    assert nonscalar.model.logit_scale.shape == (1,)
    # from 4.7, two AdamW steps of lr <= 1e-3 reach log(100) = 4.605 only through the clamp
    assert float(nonscalar.model.logit_scale.detach()) <= math.log(100) + 1e-6
    for k, v in scalar.model.state_dict().items():
        torch.testing.assert_close(nonscalar.model.state_dict()[k].reshape(v.shape), v, msg=k)


# ------------------------------------------------------------------------------------------------------ FSDP
def test_fsdp_wraps_the_nonscalar_module_and_refuses_the_default(tmp_path):
    """torch FSDP (gloo, world size 1, use_orig_params, fsdp_clip.yaml's wrap classes) takes the switched model and
    computes the unwrapped model's loss; the default model is refused. Its full state dict is a valid init_from for a
    scalar model (an FSDP stage 1 -> a DDP stage 2)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = yaml.safe_load((CONFIGS / "trainer/fsdp_clip.yaml").read_text())["trainer"]["strategy"]["init_args"]
    blocks_cls = _classes(strategy["auto_wrap_policy"])
    policy = ModuleWrapPolicy(set(blocks_cls))
    torch.manual_seed(0)
    module = _module(True)
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 16))
    out = module(images, texts)
    want = module.loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).detach()
    blocks = sum(isinstance(m, blocks_cls) for m in module.model.modules())
    assert blocks == 2  # one vision + one text block in tiny_cfg

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="scalar parameters"):
            FSDP(_module(False).model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
        wrapped = FSDP(module.model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
        assert sum(isinstance(m, FSDP) for m in wrapped.modules()) == blocks + 1
        out = wrapped(images, texts)
        loss = module.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        torch.testing.assert_close(loss.detach(), want)
        loss.backward()
        assert module.model.logit_scale.grad is not None
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            full = {k: v.clone() for k, v in wrapped.state_dict().items()}
    finally:
        torch.distributed.destroy_process_group()
    assert full["logit_scale"].shape == (1,)
    torch.save({"state_dict": {f"model.{k}": v for k, v in full.items()}}, tmp_path / "fsdp.ckpt")
    scalar = _module(False, init_from=str(tmp_path / "fsdp.ckpt"))
    assert scalar.model.logit_scale.shape == ()
    for k, v in full.items():
        torch.testing.assert_close(scalar.model.state_dict()[k].reshape(v.shape), v, rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------------------------- checkpoints
def test_init_from_across_layouts_gives_identical_weights_and_logits(stage1, tmp_path):
    """Scalar checkpoint -> nonscalar init_from -> (its checkpoint) -> scalar init_from: the same weights and the same
    features and logits at every hop."""
    images, texts = torch.randn(3, 3, 32, 32), torch.randint(1, 1000, (3, 16))
    source = stage1["module"]
    want = _outputs(source, images, texts)

    nonscalar = _module(True, init_from=str(stage1["ckpt"]))
    assert nonscalar.model.logit_scale.shape == (1,)
    _same_weights(source.model, nonscalar.model)
    for k, v in _outputs(nonscalar, images, texts).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)

    torch.save(nonscalar.model.state_dict(), tmp_path / "nonscalar.pt")
    assert read_state_dict(tmp_path / "nonscalar.pt")["logit_scale"].shape == (1,)
    back = _module(False, init_from=str(tmp_path / "nonscalar.pt"))
    assert back.model.logit_scale.shape == ()
    _same_weights(source.model, back.model)
    for k, v in _outputs(back, images, texts).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)


def test_only_the_logit_params_are_reshaped(stage1, tmp_path):
    """Strict loading stays strict: a logit_scale of another shape, or any other shape mismatch, is still refused."""
    state = read_state_dict(stage1["ckpt"])
    bad = {**state, "logit_scale": torch.ones(2)}
    assert reshape_logit_params(dict(bad), nonscalar=True) == []
    torch.save(bad, tmp_path / "bad_scale.pt")
    with pytest.raises(ValueError, match="bad_scale.pt"):
        _module(True, init_from=str(tmp_path / "bad_scale.pt"))
    other = {**state, "text_projection": state["text_projection"].reshape(1, -1)}
    torch.save(other, tmp_path / "bad_proj.pt")
    with pytest.raises(ValueError, match="bad_proj.pt"):
        _module(True, init_from=str(tmp_path / "bad_proj.pt"))
    changed = {"logit_scale": torch.tensor(2.0), "logit_bias": torch.tensor([-1.0]), "x": torch.tensor(3.0)}
    assert reshape_logit_params(changed, nonscalar=True) == ["logit_scale"]
    assert changed["logit_scale"].shape == changed["logit_bias"].shape == (1,)
    assert changed["x"].shape == ()


def test_resume_and_ckpt_path_across_layouts(stage1, tmp_path):
    """Lightning's own loading (fit/validate ``ckpt_path``, load_from_checkpoint) goes through on_load_checkpoint:
    resuming a scalar checkpoint with the switch on continues exactly as the scalar resume does (weights and AdamW
    state reshaped), and that nonscalar checkpoint validates and loads in a scalar module."""
    resumed = {}
    for nonscalar in (False, True):
        module = _module(nonscalar)
        losses = _fit(module, stage1["shards"], 2, ckpt_path=stage1["ckpt"], save=tmp_path / f"{nonscalar}.ckpt")
        resumed[nonscalar] = (module, losses)
    assert len(resumed[True][1]) == 1  # one more step after the checkpoint's
    torch.testing.assert_close(resumed[True][1], resumed[False][1], rtol=1e-6, atol=1e-7)
    assert resumed[True][0].model.logit_scale.shape == (1,)
    for k, v in resumed[False][0].model.state_dict().items():
        torch.testing.assert_close(resumed[True][0].model.state_dict()[k].reshape(v.shape), v, msg=k)
    ckpt = torch.load(tmp_path / "True.ckpt", weights_only=True)
    assert ckpt["state_dict"]["model.logit_scale"].shape == (1,)
    assert ckpt["hyper_parameters"]["nonscalar_logit_scale"] is True

    # `test` / `validate --ckpt_path` of the nonscalar run without the FSDP overlay: a scalar module
    scalar = _module(False)
    metrics = _trainer(0).validate(
        scalar, datamodule=_dm(stage1["shards"]), ckpt_path=tmp_path / "True.ckpt", weights_only=True
    )
    assert math.isfinite(metrics[0]["val/loss"])
    _same_weights(resumed[True][0].model, scalar.model)
    loaded = ClipModule.load_from_checkpoint(tmp_path / "True.ckpt", nonscalar_logit_scale=False, weights_only=True)
    assert loaded.model.logit_scale.shape == ()
    _same_weights(resumed[True][0].model, loaded.model)


# ---------------------------------------------------------------------------------------------------- export
def test_export_of_a_nonscalar_model_loads_in_plain_open_clip(stage1, tmp_path):
    """export-clip of a model trained with the switch writes open_clip's default layout: the weights load strictly
    into a plain ``open_clip.CLIP`` of the written config, and open_clip's loaders (pretrained=FILE, local-dir:) give
    the module's features; the folder also works as a ``local-dir:`` ClipModule with the switch on."""
    from safetensors.torch import load_file

    module = _module(True, init_from=str(stage1["ckpt"]))
    _fit(module, stage1["shards"], 1, save=tmp_path / "nonscalar.ckpt")
    out = export_clip(tmp_path / "nonscalar.ckpt", tmp_path / "export", name="tiny-recap-fsdp")
    config = json.loads((out / "open_clip_config.json").read_text())
    assert "nonscalar_logit_scale" not in config["model_cfg"]
    weights = load_file(str(out / "open_clip_model.safetensors"))
    assert weights["logit_scale"].shape == ()
    plain = open_clip.CLIP(**config["model_cfg"])
    plain.load_state_dict(weights, strict=True)  # no reshaping on the reader's side

    images = torch.randn(3, 3, 32, 32)
    texts = ["a red star on the left", "two circles", "IMG_2031.jpg"]
    module.eval()
    with torch.no_grad():
        want_img, want_txt = module.encode_images(images), module.encode_texts(texts)
    open_clip.add_model_config(out / "tiny-recap-fsdp.json")
    named, _, _ = open_clip.create_model_and_transforms(
        "tiny-recap-fsdp", pretrained=str(out / "open_clip_model.safetensors")
    )
    local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    for model in (named, local):
        model.eval()
        assert model.logit_scale.shape == ()
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images, normalize=True), want_img)
            torch.testing.assert_close(model.encode_text(tokenizer(texts), normalize=True), want_txt)
        assert float(model.logit_scale.detach()) == float(module.model.logit_scale.detach())

    again = ClipModule(f"local-dir:{out}", lr=1e-3, nonscalar_logit_scale=True)
    assert again.model.logit_scale.shape == (1,)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_images(images), want_img)
