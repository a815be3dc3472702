"""export-captioner never exports weights that were not trained or loaded: a checkpoint of a module whose frozen towers
were drawn from config dicts exports the module that was trained (twice the same folder, the module's captions), an
older checkpoint without those weights is refused naming them, and an unsafe checkpoint is one line, not a traceback."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import test_captioner
import torch
from PIL import Image
from safetensors.torch import load_file
from test_captioner import VISION, llm_config, module

from experiments.export_captioner import export_captioner, main
from lightning_modules.captioner import CaptionerModule

# test_captioner's module-scoped fixtures: a tiny world and its LLaMA-3-style tokenizer
world, tok_dir, tok = test_captioner.world, test_captioner.tok_dir, test_captioner.tok


def _images(n: int = 6) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def _perturb(model: torch.nn.Module, trainable_only: bool = True) -> None:
    """Weights large enough that captions differ between images (LoRA deltas not zero): what training did to the
    trainable ones, and for random frozen towers, a draw that is nobody's default."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or not trainable_only:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _save(m: CaptionerModule, path: Path) -> dict:
    """What Lightning writes: the module's state dict and hyperparameters, through its on_save_checkpoint."""
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return ckpt


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _captions_of(folder: Path, images: list) -> list[str]:
    return CaptionerModule(pretrained=str(folder), lr=1e-3, max_new_tokens=12).caption(images)


@pytest.mark.parametrize("stage", [{}, {"train_llm": True, "lora": {"r": 4, "lora_alpha": 8}}], ids=["stage1", "lora"])
def test_trainable_only_checkpoint_of_config_dict_towers_exports_the_trained_model(stage, tok_dir, tok, tmp_path):
    m = module(tok_dir, tok, **stage)  # vision tower and LLM from config dicts: random, frozen
    _perturb(m.model, trainable_only=False)
    ckpt = _save(m, tmp_path / "last.ckpt")
    kept = set(ckpt["state_dict"])
    assert any(".vision_tower." in k for k in kept)
    assert any(".language_model." in k for k in kept)
    assert not any(p.requires_grad for n, p in m.model.named_parameters() if ".vision_tower." in n)

    first = export_captioner(tmp_path / "last.ckpt", tmp_path / "a")
    second = export_captioner(tmp_path / "last.ckpt", tmp_path / "b")
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    want = {k.removeprefix("model."): v for k, v in m.merged_model().state_dict().items() if ".vision_tower." in k}
    assert want
    assert all(torch.equal(a[k], v) for k, v in want.items())

    images = _images()
    ours = m.caption(images)
    assert len(set(ours)) > 1  # the captions depend on the image
    assert _captions_of(first, images) == ours


def test_checkpoint_without_the_random_frozen_weights_is_refused(tok_dir, tok, tmp_path, capsys):
    """A trainable-only checkpoint written before such weights were kept: the towers cannot be rebuilt."""
    m = module(tok_dir, tok)
    state = {k: v for k, v in m.state_dict().items() if "multi_modal_projector" in k}  # what was saved before
    torch.save({"state_dict": state, "hyper_parameters": dict(m.hparams)}, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="old.ckpt lacks") as exc:
        export_captioner(tmp_path / "old.ckpt", tmp_path / "out")
    msg = str(exc.value)
    assert "(LLM, vision tower:" in msg
    assert "model.model.vision_tower." in msg or "model.model.language_model." in msg
    assert "save_frozen: true" in msg
    assert not (tmp_path / "out").exists()
    # the command: one line, exit code 1
    with pytest.raises(SystemExit) as code:
        main(["--ckpt", str(tmp_path / "old.ckpt"), "--out", str(tmp_path / "out")])
    assert code.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "old.ckpt lacks" in err
    assert not (tmp_path / "out").exists()


def test_towers_from_folders_need_only_the_trainable_weights(tok_dir, tok, tmp_path):
    """Frozen towers loaded from saved folders come back from there; an LLM whose vocabulary grows for <image> gets
    new rows that are a function of its weights (their mean), so two exports of one checkpoint are identical."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(3)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION))
    _perturb(tower, trainable_only=False)
    tower.save_pretrained(tmp_path / "tower")
    small_vocab = {**llm_config(tok), "vocab_size": len(tok) - 3, "tie_word_embeddings": False}
    lm = LlamaForCausalLM(LlamaConfig(**small_vocab))
    _perturb(lm, trainable_only=False)
    lm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    m = module(tok_dir, tok, vision_tower=str(tmp_path / "tower"), llm=str(tmp_path / "llm"), tokenizer=None)
    _perturb(m.model)
    ckpt = _save(m, tmp_path / "last.ckpt")
    assert all("multi_modal_projector" in k for k in ckpt["state_dict"])  # only what trains

    a = _tensors(export_captioner(tmp_path / "last.ckpt", tmp_path / "a"))
    b = _tensors(export_captioner(tmp_path / "last.ckpt", tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    old = small_vocab["vocab_size"]
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    grown = [(exported.get_input_embeddings(), lm.model.embed_tokens), (exported.get_output_embeddings(), lm.lm_head)]
    for layer, src in grown:
        rows = layer.weight.shape[0]
        assert rows % 64 == 0
        assert rows >= len(tok)
        assert torch.equal(layer.weight[:old], src.weight)
        torch.testing.assert_close(layer.weight[old:], src.weight.mean(0, keepdim=True).expand(rows - old, -1))
    images = _images(4)
    ours = m.caption(images)
    assert len(set(ours)) > 1
    assert _captions_of(tmp_path / "a", images) == ours


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_unsafe_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1e-3}, "x": _Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):  # a real trap
        torch.load(path, weights_only=True)
    with pytest.raises(SystemExit) as code:
        main(["--ckpt", str(path), "--out", str(tmp_path / "out")])
    assert code.value.code == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{path}: refused as unsafe" in lines[0]
    assert "posix.mkdir" in lines[0]
    assert "weights_only=False" not in err
    assert "`weights_only` set to `False`" not in err
    assert "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
