"""export-clip writes a self-contained folder: copied to another place, with the training paths gone and Hugging Face
offline, it loads through every documented route (open_clip's ``local-dir:``, a registered config name, the suite's
own ``build_clip``) and gives the module's features and tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from experiments.export_clip import export_clip
from lightning_modules.clip import ClipModule

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a red star on the left", "two blue circles", "IMG_2031.jpg unknownword"]
WORDS = ["a", "red", "star", "on", "the", "left", "two", "blue", "circles", "img", "_", "2031", ".", "jpg"]


def tiny_cfg() -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 64,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "no_causal_mask": True,
            "pool_type": "last",
            "tokenizer_kwargs": {"strip_sep_token": True},
        },
    }


def bert_folder(path: Path) -> Path:
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    return path


# Run in a fresh interpreter that can see only the copied folder: loads it every documented way and saves what each
# route gives (tokens, image and text features) for the test to compare with the module's.
LOADER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import open_clip, torch
    from lightning_modules.components.clip_model import build_clip

    folder, name = Path(sys.argv[1]), sys.argv[2]
    texts = json.loads(sys.argv[3])
    images = torch.load(sys.argv[4], weights_only=True)
    out = {}

    def run(key, model, tokenizer):
        model.eval()
        tokens = tokenizer(texts)
        with torch.no_grad():
            out[key] = {"tokens": tokens, "image": model.encode_image(images, normalize=True),
                        "text": model.encode_text(tokens, normalize=True)}

    # 1) open_clip's own local-dir loaders
    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    run("open_clip_local_dir", model, open_clip.get_tokenizer(f"local-dir:{folder}"))
    # 2) open_clip with the registered config name + pretrained=PATH (tokenizer from the folder)
    open_clip.add_model_config(folder / f"{name}.json")
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(folder / "open_clip_model.safetensors"))
    run("open_clip_name", model, open_clip.get_tokenizer(f"local-dir:{folder}"))
    # 3) the suite's own loader (what `model: local-dir:DIR` builds in ClipModule)
    parts = build_clip(f"local-dir:{folder}")
    run("suite_local_dir", parts.model, parts.tokenizer)
    # 4) the suite with the folder's config file (`model: DIR/<name>.json` + `init_from: DIR/...safetensors`)
    parts = build_clip(str(folder / f"{name}.json"))
    from lightning_modules.components.clip_model import load_clip_weights
    load_clip_weights(parts.model, folder / "open_clip_model.safetensors")
    run("suite_config_file", parts.model, parts.tokenizer)
    torch.save(out, sys.argv[5])
    """
)


def test_export_loads_after_copying_with_the_training_paths_gone(tmp_path):
    train = tmp_path / "train"
    module = ClipModule(tiny_cfg(), tokenizer=str(bert_folder(train / "bert")), lr=1e-3)
    torch.manual_seed(1)
    with torch.no_grad():  # weights that are nobody's default
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = train / "last.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)  # as Lightning
    export = export_clip(ckpt, train / "export", name="tiny-export-test")

    module.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = {
            "tokens": module.tokenizer(TEXTS),
            "image": module.encode_images(images),
            "text": module.encode_texts(TEXTS),
        }
    assert int((want["tokens"] == 1).sum()) == 1  # [UNK] for the unknown word: the vocabulary is the folder's own

    # another machine: only the copied folder; the training folder (tokenizer included) is gone
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(export, elsewhere / "model")
    shutil.move(train, tmp_path / "gone")
    torch.save(images, elsewhere / "images.pt")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty_hf_home"),
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(elsewhere / "model"), "tiny-export-test", json.dumps(TEXTS)]
        + [str(elsewhere / "images.pt"), str(elsewhere / "got.pt")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(elsewhere / "got.pt", weights_only=True)
    assert sorted(got) == ["open_clip_local_dir", "open_clip_name", "suite_config_file", "suite_local_dir"]
    for route, g in got.items():
        assert torch.equal(g["tokens"], want["tokens"]), route
        torch.testing.assert_close(g["image"], want["image"], msg=route)
        torch.testing.assert_close(g["text"], want["text"], msg=route)
    # nothing in the folder points back at the training machine
    for config in ("open_clip_config.json", "tiny-export-test.json"):
        assert str(tmp_path) not in (elsewhere / "model" / config).read_text()
