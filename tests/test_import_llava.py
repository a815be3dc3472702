"""import-llava: a tiny checkpoint written in the original LLaVA layout (haotian-liu/LLaVA: ``llava_llama`` config,
``model.mm_projector.0/2``, LLaMA under ``model.*``, the vision tower only by name) becomes a llava-hf folder whose
greedy captions through ``recaption run`` equal LLaVA's own forward of the original weights, written out here."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from datamodules.tiny_world import WorldConfig, generate_world
from experiments.__main__ import main
from experiments.import_llava import import_llava
from experiments.jobs.recaption import degenerate
from experiments.tiny_llm import train_world_tokenizer
from lightning_modules.components.llava import PAPER_RECAPTION_PROMPT

# The LLaMA-3 conversation the paper's captioner was prompted with ([ISS #2]: LLaVA with LLaMA-3's template), with
# LLaVA's "<image>\n" before the question.
LLAMA3_PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# named as openai/clip-vit-large-patch14-336 is: the input size last
TOWER_NAME = f"tiny/clip-vit-patch16-{WorldConfig.tiny().scene.image_size}"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("llava")
    world = root / "world"
    generate_world(world, WorldConfig.tiny(seed=0, n_web=24, shard_size=12, workers=1))
    src = root / "src"
    tok = train_world_tokenizer(world, src, vocab_size=400)
    tok.chat_template = None  # the checkpoint's own tokenizer need not carry the template it was trained with
    tok.save_pretrained(src)

    torch.manual_seed(0)
    side = WorldConfig.tiny().scene.image_size  # the tower's input size: world images are not resized
    vision = CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=side, patch_size=16
    )
    tower = CLIPVisionModel(vision).eval()
    tower.save_pretrained(root / "tower")  # what --vision-tower names; not part of the checkpoint
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        root / "tower"
    )
    llm_config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500000.0,
        initializer_range=0.3,  # peaked logits: greedy choices are not near-ties that float noise could flip
        tie_word_embeddings=False,
    )
    lm = LlamaForCausalLM(llm_config).eval()
    # LLaVA's mlp2x_gelu (multimodal_projector/builder.py); scaled so that the image shapes the caption
    projector = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    with torch.no_grad():
        projector[2].weight.mul_(10)

    state = {**lm.state_dict(), **{f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}}
    state = {k: v.contiguous() for k, v in state.items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(src / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    # config.json as LLaVA (transformers 4.40) wrote the released captioner's: LlamaConfig keys + LLaVA's own
    config = {k: v for k, v in llm_config.to_dict().items() if k not in ("rope_parameters", "dtype")}
    config |= {"rope_theta": 500000.0, "torch_dtype": "float32", "model_type": "llava_llama"}
    config |= {"architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": TOWER_NAME}
    config |= {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 24, "mm_vision_select_layer": -2}
    config |= {"mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat"}
    config |= {"mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_projector_lr": 2e-5}
    config |= {"tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "use_mm_proj": True}
    config |= {"tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False}
    (src / "config.json").write_text(json.dumps(config))
    return dict(root=root, world=world, src=src, tower=root / "tower", tok=tok, lm=lm, vision=tower, proj=projector)


def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:  # LLaVA's llava/mm_utils.py
    w, h = img.size
    if w == h:
        return img
    out = Image.new(img.mode, (max(w, h), max(w, h)), background)
    out.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


def llava_pixels(tower_dir: Path, images: list[Image.Image]) -> torch.Tensor:
    """LLaVA's process_images with image_aspect_ratio pad (PIL CLIPImageProcessor, as in its transformers 4.3x)."""
    from transformers import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil.from_pretrained(tower_dir)
    background = tuple(int(x * 255) for x in ip.image_mean)
    return ip.preprocess([expand2square(im, background) for im in images], return_tensors="pt")["pixel_values"]


@torch.no_grad()
def llava_caption(o: dict, image: Image.Image, max_new_tokens: int) -> str:
    """LLaVA's forward of the original modules: CLIP hidden state mm_vision_select_layer (-2) without the class token
    (patch), the projector, spliced where <image> is (prepare_inputs_labels_for_multimodal), greedy, no KV cache."""
    tok, lm = o["tok"], o["lm"]
    hidden = o["vision"](llava_pixels(o["tower"], [image]), output_hidden_states=True).hidden_states[-2]
    features = o["proj"](hidden[:, 1:])[0]
    before, after = LLAMA3_PROMPT.format(PAPER_RECAPTION_PROMPT).split("<image>")
    embed = lm.get_input_embeddings()
    ids = [torch.tensor(tok(t, add_special_tokens=False).input_ids) for t in (before, after)]
    seq = torch.cat([embed(ids[0]), features, embed(ids[1])])
    stop = {tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")}
    out: list[int] = []
    while len(out) < max_new_tokens:
        nxt = int(lm(inputs_embeds=seq[None]).logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
        seq = torch.cat([seq, embed(torch.tensor([nxt]))])
    return tok.decode(out, skip_special_tokens=True).strip()


def test_recaption_run_on_the_imported_folder_equals_llavas_forward_of_the_original(original, tmp_path, capsys):
    out = tmp_path / "hf"
    main(["import-llava", "--src", str(original["src"]), "--out", str(out), "--vision-tower", str(original["tower"])])
    assert "imported" in capsys.readouterr().out
    assert {"preprocessor_config.json", "processor_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_feature_layer"] == -2
    assert cfg["vision_feature_select_strategy"] == "default"
    assert cfg["text_config"]["rope_parameters"]["rope_theta"] == 500000.0

    shard = sorted((original["world"] / "web").glob("*.tar"))[0]
    from experiments.jobs.recaption import main as recaption_main

    args = ["run", "--model", str(out), "--shards", str(shard), "--out", str(tmp_path / "rc"), "--device", "cpu"]
    totals = recaption_main([*args, "--max-new-tokens", "6", "--batch-size", "5", "--no-progress"])
    rows = pq.read_table(tmp_path / "rc" / f"{shard.stem}.parquet").to_pylist()
    assert totals["rows"] == len(rows) == 12

    with tarfile.open(shard) as tar:
        jpgs = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    expected = {k: llava_caption(original, Image.open(io.BytesIO(b)).convert("RGB"), 6) for k, b in jpgs.items()}
    assert not [c for c in expected.values() if degenerate(c)]  # plain greedy: the job's retry path never runs
    assert {r["key"]: r["re_caption"] for r in rows} == expected
    assert not any(r["retried"] for r in rows)
    assert len(set(expected.values())) > 1  # the image reaches the caption


def test_processor_pads_to_a_square_in_the_mean_colour_as_llava_does(original, tmp_path):
    from transformers import AutoProcessor

    out = import_llava(original["src"], tmp_path / "hf", original["tower"])
    processor = AutoProcessor.from_pretrained(out)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 100), (90, 50))]
    ours = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    theirs = llava_pixels(original["tower"], images)
    # torchvision's bicubic resize vs LLaVA's PIL one: 8-bit rounding, at most one level on a few pixels
    one_level = 1 / 255 / min(processor.image_processor.image_std)
    assert (ours - theirs).abs().max() <= one_level * 1.01
    assert (ours - theirs).abs().mean() < one_level / 50


def test_sharded_safetensors_and_a_bin_file_import_to_the_same_weights(original, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "bin"
    shutil.copytree(original["src"], src, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = {}
    for f in original["src"].glob("*.safetensors"):
        state |= load_file(str(f))
    torch.save(state, src / "pytorch_model.bin")
    a = load_file(str(import_llava(original["src"], tmp_path / "a", original["tower"]) / "model.safetensors"))
    b = load_file(str(import_llava(src, tmp_path / "b", original["tower"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    (key,) = [k for k in a if k.endswith("multi_modal_projector.linear_2.weight")]
    torch.testing.assert_close(a[key], original["proj"][2].weight)


def variant(original: dict, tmp_path: Path, config: dict | None = None, drop: str | None = None) -> Path:
    """A copy of the checkpoint with config keys changed and/or one weight left out of the index."""
    src = tmp_path / "variant"
    shutil.copytree(original["src"], src)
    if config:
        path = src / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    if drop:
        path = src / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        del index["weight_map"][drop]
        path.write_text(json.dumps(index))
    return src


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "llava_mistral"}, r"config.json: model_type is 'llava_mistral'"),
        ({"mm_projector_type": "linear"}, r"config.json: mm_projector_type is 'linear'"),
        ({"mm_vision_select_feature": "cls"}, r"config.json: mm_vision_select_feature is 'cls'"),
        ({"image_aspect_ratio": "anyres"}, r"config.json: image_aspect_ratio is 'anyres'"),
        ({"mm_use_im_start_end": True}, r"config.json: mm_use_im_start_end is True"),
        ({"mm_hidden_size": 1024}, r"config.json: mm_hidden_size 1024 != .*tower's 24"),
        ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, r"config.json: mm_vision_tower .* takes 336 px"),
        ({"mm_vision_select_layer": None}, r"config.json: mm_vision_select_layer is None"),
    ],
)
def test_unsupported_configs_are_named_by_file_and_key(original, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        import_llava(variant(original, tmp_path, config=change), tmp_path / "out", original["tower"])
    assert not (tmp_path / "out").exists()


def test_missing_tower_weights_and_shards_are_named(original, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["import-llava", "--src", str(original["src"]), "--out", str(tmp_path / "out")])
    assert exc.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"mm_vision_tower is '{TOWER_NAME}'" in line
    assert "--vision-tower" in line

    src = variant(original, tmp_path, drop="model.mm_projector.2.bias")
    with pytest.raises(ValueError, match=r"index.json: missing weights model.mm_projector.2.bias"):
        import_llava(src, tmp_path / "out", original["tower"])
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"weight_map names model-00002-of-00002.safetensors"):
        import_llava(src, tmp_path / "out", original["tower"])
    state = {k: v.contiguous() for k, v in original["lm"].state_dict().items()}
    state |= {f"model.mm_projector.{k}": v for k, v in original["proj"].state_dict().items()}
    save_file(state | {"model.image_newline": torch.zeros(32)}, str(src / "model.safetensors"))  # LLaVA-NeXT's
    (src / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=r"model.safetensors: weights this importer does not know: model.image_newl"):
        import_llava(src, tmp_path / "out", original["tower"])


def test_a_pickled_bin_is_refused(original, tmp_path):
    src = tmp_path / "evil"
    shutil.copytree(original["src"], src, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save({"model.embed_tokens.weight": torch.zeros(1), "x": Path("/")}, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: refused as unsafe"):
        import_llava(src, tmp_path / "out", original["tower"])


def test_tower_weights_in_the_checkpoint_replace_the_folders(original, tmp_path):
    """A checkpoint that trained its tower (unfreeze_mm_vision_tower; BakLLaVA) holds it under
    model.vision_tower.vision_tower.*: those weights win over --vision-tower's, which then gives the config only."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    src = tmp_path / "trained_tower"
    shutil.copytree(original["src"], src, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.manual_seed(1)
    trained = CLIPVisionModel(original["vision"].config).state_dict()
    state = {k: v.contiguous() for k, v in original["lm"].state_dict().items()}
    state |= {f"model.mm_projector.{k}": v for k, v in original["proj"].state_dict().items()}
    state |= {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in trained.items()}  # LLaVA's names
    save_file(state, str(src / "model.safetensors"))
    saved = load_file(str(import_llava(src, tmp_path / "out", original["tower"]) / "model.safetensors"))
    name = "encoder.layers.0.mlp.fc1.weight"
    (key,) = [k for k in saved if k.endswith(name)]
    assert torch.equal(saved[key], trained[name])
    assert not torch.equal(saved[key], original["vision"].state_dict()[name])
