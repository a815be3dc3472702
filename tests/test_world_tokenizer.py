"""The tiny world's captioner tokenizer: byte-level BPE, LLaMA-3 specials, the LLaVA chat template, reload from disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from datamodules.chat import (
    IMAGE_TOKEN,
    LLAMA3_ADDITIONAL_TOKENS,
    LLAMA3_LLAVA_CHAT_TEMPLATE,
    LLAMA3_SPECIAL_TOKENS,
    ConversationEncoder,
)
from datamodules.tiny_world import WorldConfig, generate_world
from datamodules.tiny_world.writer import world_texts
from experiments.tiny_llm import STAMP_NAME, train_world_tokenizer
from experiments.tiny_llm import tokenizer_main as main

VOCAB = 512
SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<image>",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, WorldConfig.tiny(seed=0, workers=1))
    return out


@pytest.fixture(scope="module")
def tok_dir(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "t"
    train_world_tokenizer(world, out, VOCAB)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_reloads_with_settings(tok, tok_dir):
    assert tok.chat_template == LLAMA3_LLAVA_CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        LLAMA3_SPECIAL_TOKENS["bos_token"],
        LLAMA3_SPECIAL_TOKENS["eos_token"],
        LLAMA3_SPECIAL_TOKENS["pad_token"],
    )
    assert tok.padding_side == "right"
    assert tok.model_max_length == 1024
    assert 256 + len(SPECIALS) < len(tok) <= VOCAB
    assert json.loads((tok_dir / STAMP_NAME).read_text())["vocab_size"] == VOCAB


def test_special_tokens_are_single_ids(tok):
    assert set(SPECIALS) == {*LLAMA3_SPECIAL_TOKENS.values(), *LLAMA3_ADDITIONAL_TOKENS, IMAGE_TOKEN}
    assert [tok.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    assert set(SPECIALS) <= set(tok.all_special_tokens)
    for i, t in enumerate(SPECIALS):
        assert tok.encode(t, add_special_tokens=False) == [i]
        ids = tok.encode(f"a red star{t}on the left", add_special_tokens=False)
        assert ids.count(i) == 1
        assert tok.decode(ids) == f"a red star{t}on the left"
    assert tok.encode("hello", add_special_tokens=True)[0] != tok.bos_token_id  # no automatic bos


def test_every_world_text_round_trips(tok, world):
    texts = world_texts(world)
    assert len(texts) > 500
    assert any(IMAGE_TOKEN in t for t in texts)
    assert any("crimson" in t.lower() or "teal" in t.lower() for t in texts)
    for t in [*texts, "Ünïcode ✓ 日本語 — tabs\tand\nnewlines  double  spaces ", ""]:
        ids = tok.encode(t, add_special_tokens=False)
        assert tok.decode(ids) == t, t
    # Even a 512-token vocabulary from the tiny test world makes most of the world's words whole tokens.
    desc = "The image shows two shapes against a solid gray background."
    assert len(tok.encode(desc, add_special_tokens=False)) < len(desc) / 3


def test_chat_template_renders_llama3_llava(tok):
    msgs = [{"role": "user", "content": "<image>\nDescribe."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nDescribe.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    assert tok.decode(ids) == text


def test_assistant_mask_covers_exactly_the_replies(tok):
    r1 = "A large red star on the left side of a solid gray background."
    r2 = "There are two shapes in the image."
    msgs = [
        {"role": "user", "content": "<image>\nDescribe the image concisely."},
        {"role": "assistant", "content": r1},
        {"role": "user", "content": "How many shapes are in the image?"},
        {"role": "assistant", "content": r2},
    ]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    assert len(ids) == len(mask)
    assert ids.count(tok.bos_token_id) == 1
    assert ids[0] == tok.bos_token_id
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == r1 + "<|eot_id|>" + r2 + "<|eot_id|>"
    enc = ConversationEncoder(tok, num_image_tokens=4, max_length=256)(msgs)
    assert enc["n_images"] == 1
    assert int((enc["input_ids"] == tok.convert_tokens_to_ids(IMAGE_TOKEN)).sum()) == 4
    assert tok.decode([int(i) for i in enc["labels"] if i >= 0]) == r1 + "<|eot_id|>" + r2 + "<|eot_id|>"


def test_training_is_deterministic(world, tok_dir, tmp_path):
    again = tmp_path / "again"
    train_world_tokenizer(world, again, VOCAB)
    assert (again / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_cli_skips_a_current_tokenizer_and_guards_others(world, tmp_path, capsys):
    out = tmp_path / "tok"
    first = main(["--world", str(world), "--out", str(out), "--vocab-size", "300"])
    assert not first["skipped"]
    assert first["vocab_size"] <= 300
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    assert main(["--world", str(world), "--out", str(out), "--vocab-size", "300"])["skipped"]
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        main(["--world", str(world), "--out", str(out), "--vocab-size", "320"])
    redo = main(["--world", str(world), "--out", str(out), "--vocab-size", "320", "--overwrite"])
    assert not redo["skipped"]
    assert json.loads((out / STAMP_NAME).read_text())["vocab_size"] == 320
    assert '"skipped": false' in capsys.readouterr().out
