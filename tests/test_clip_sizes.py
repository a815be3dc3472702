"""Named Recap-CLIP sizes (paper Table 2) and the released HTxt / CLIPA tower style."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from open_clip.tokenizer import HFTokenizer

from lightning_modules.components.clip_sizes import (
    RELEASED_HTXT_L16,
    TABLE2,
    TEXT_SIZES,
    VISION_SIZES,
    config_mismatches,
    count_params,
    parse_model_name,
    recap_clip_config,
)

TOL = 0.03


def _rel_errors(got: dict[str, int], table_m: dict[str, float]) -> dict[str, float]:
    return {k: got[k] / (table_m[k] * 1e6) - 1 for k in ("vision", "text", "total")}


@pytest.mark.parametrize(
    ("vision", "text", "row"),
    [("S-16", "small", "S/16"), ("B/16", "base", "B/16"), ("L-16", "large", "L/16"), ("H-14", "huge", "H/14")],
)
def test_table2_rows_param_counts(vision, text, row):
    cfg = recap_clip_config(vision, text)
    errs = _rel_errors(count_params(cfg), TABLE2[row]["params_m"])
    assert all(abs(e) <= TOL for e in errs.values()), f"{row}: relative errors {errs}"

    # the architecture really is the table's: layers / widths / heads as built by open_clip
    (vl, vw, vh), (tl, tw, th) = TABLE2[row]["vision"], TABLE2[row]["text"]
    with torch.device("meta"):
        m = open_clip.CLIP(**cfg)
    assert cfg["embed_dim"] == TABLE2[row]["embed_dim"] == m.text_projection.shape[1] == m.visual.proj.shape[1]
    assert (len(m.visual.transformer.resblocks), m.visual.transformer.width) == (vl, vw)
    assert m.visual.transformer.resblocks[0].attn.num_heads == vh
    assert (len(m.transformer.resblocks), m.transformer.width) == (tl, tw)
    assert m.transformer.resblocks[0].attn.num_heads == th
    assert m.visual.patch_size == (int(row[2:]),) * 2
    assert (m.vocab_size, m.context_length) == (32000, 128)


def test_classic_vocab_does_not_reproduce_table2():
    # the 32000-token vocabulary is what makes the text counts work: SimpleTokenizer's 49408 is > 3% off for S
    errs = _rel_errors(count_params(recap_clip_config("S-16", "small", style="openai")), TABLE2["S/16"]["params_m"])
    assert errs["text"] > TOL, errs


def test_mixed_pairing_b16_large():
    cfg = recap_clip_config("B-16", "large")
    assert cfg["embed_dim"] == VISION_SIZES["B-16"]["embed_dim"] == 512  # vision row's embed dim
    got = count_params(cfg)
    same_vision = count_params(recap_clip_config("B-16", "base"))["vision"]
    large_text = count_params(recap_clip_config("L-16", "large"))["text"]  # projection 768 -> 768
    width = TEXT_SIZES["large"]["width"]
    proj_delta = width * (512 - TABLE2["L/16"]["embed_dim"])  # 768 -> 512 projection instead
    assert got["vision"] == same_vision
    assert got["text"] == large_text + proj_delta
    table_text = TABLE2["L/16"]["params_m"]["text"] * 1e6 + proj_delta
    rel = {
        "vision": got["vision"] / (TABLE2["B/16"]["params_m"]["vision"] * 1e6) - 1,
        "text": got["text"] / table_text - 1,
    }
    assert all(abs(e) <= TOL for e in rel.values()), f"B-16 + large: relative errors {rel}"


def test_released_htxt_config_equality():
    ours = recap_clip_config("L-16", "huge")
    assert config_mismatches(ours, RELEASED_HTXT_L16) == []
    # the keys we add beyond the released ones (head_width) are open_clip's defaults: identical parameter shapes
    with torch.device("meta"):
        a, b = open_clip.CLIP(**ours), open_clip.CLIP(**copy.deepcopy(RELEASED_HTXT_L16))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    # and the check can fail
    assert "text_cfg.width: 768 != 1024" in config_mismatches(recap_clip_config("L-16", "large"))
    openai_mismatches = config_mismatches(parse_model_name("recap-clip:L-16:huge:openai"))
    assert any(m.startswith("text_cfg.no_causal_mask") for m in openai_mismatches), openai_mismatches


def test_names_and_errors():
    assert recap_clip_config("B/16", "base") == recap_clip_config("B-16", "base")
    assert set(VISION_SIZES) == {"S-16", "B-16", "L-16", "H-14"}
    assert set(TEXT_SIZES) == {"small", "base", "large", "huge"}
    assert VISION_SIZES["H-14"]["head_width"] == 80
    assert VISION_SIZES["L-16"]["head_width"] == 64
    with pytest.raises(ValueError, match="B-16.*H-14.*L-16.*S-16"):
        recap_clip_config("G-14", "base")
    with pytest.raises(ValueError, match="base.*huge.*large.*small"):
        recap_clip_config("B-16", "giant")
    with pytest.raises(ValueError, match="htxt"):
        recap_clip_config("B-16", "base", style="siglip")
    with pytest.raises(ValueError, match="argmax"):
        recap_clip_config("B-16", "base", style="openai", tokenizer="bert-base-uncased")
    openai = recap_clip_config("B-16", "base", style="openai")
    assert openai["text_cfg"]["vocab_size"] == 49408
    assert "hf_tokenizer_name" not in openai["text_cfg"]
    assert openai["text_cfg"]["pool_type"] == "argmax"
    assert openai["vision_cfg"]["pool_type"] == "tok"
    assert recap_clip_config("B-16", "base", vocab_size=30522)["text_cfg"]["vocab_size"] == 30522


def test_parse_model_name():
    assert parse_model_name("ViT-B-16") is None
    assert parse_model_name("local-dir:/x") is None
    assert parse_model_name("recap-clip:B-16:base") == recap_clip_config("B-16", "base")
    assert parse_model_name("recap-clip:B-16:base:htxt") == recap_clip_config("B-16", "base")
    assert parse_model_name("recap-clip:L-16:huge:openai") == recap_clip_config("L-16", "huge", style="openai")
    assert parse_model_name("recap-clip:L-16:huge") == recap_clip_config("L-16", "huge")
    assert parse_model_name("recap-clip:S/16:Small")["embed_dim"] == 384
    tiny = parse_model_name("recap-clip:L-16:huge:tiny")  # a scale by name: the tiny world's stand-in
    assert tiny == recap_clip_config("L-16", "huge", scale="tiny")
    assert (tiny["embed_dim"], tiny["vision_cfg"]["patch_size"], tiny["text_cfg"]["width"]) == (96, 8, 128)
    assert (tiny["text_cfg"]["context_length"], tiny["text_cfg"]["vocab_size"]) == (64, 49408)
    assert "hf_tokenizer_name" not in tiny["text_cfg"]
    for bad, match in [
        ("recap-clip:B-16", "expected"),
        ("recap-clip:B-16:base:htxt:x", "expected"),
        ("recap-clip::base", "expected"),
        ("recap-clip:X-16:base", "valid"),
        ("recap-clip:B-16:base:clipa", "htxt"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_model_name(bad)


# ---------------------------------------------------------------- a real (tiny) HTxt model on CPU

WORDS = ["a", "photo", "of", "the", "cat", "dog", "sitting", "on", "red", "blue", "mat", "grass", "##s", "##ing"]
CTX = 12


def _tiny(cfg: dict) -> dict:
    """Same style keys, tiny dims."""
    cfg = copy.deepcopy(cfg)
    cfg["embed_dim"] = 16
    cfg["vision_cfg"].update(image_size=32, patch_size=8, layers=2, width=32, head_width=16)
    cfg["text_cfg"].update(layers=2, width=32, heads=2)
    return cfg


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT WordPiece tokenizer written offline. transformers 5's BertTokenizer ignores `vocab_file=` (silently
    keeps its 5 special tokens), so the vocabulary is passed as a dict."""
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    out = tmp_path_factory.mktemp("tiny-bert")
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(out)
    return out


def test_tiny_htxt_model(bert_dir):
    torch.manual_seed(0)
    base = recap_clip_config("S-16", "small", context_length=CTX, vocab_size=len(WORDS) + 5, tokenizer=str(bert_dir))
    cfg = _tiny(base)
    tcfg = cfg["text_cfg"]
    tok = HFTokenizer(tcfg["hf_tokenizer_name"], context_length=tcfg["context_length"], **tcfg["tokenizer_kwargs"])
    hft = tok.tokenizer
    assert (hft.pad_token_id, hft.unk_token_id, hft.cls_token_id, hft.sep_token_id) == (0, 1, 2, 3)
    ids = tok(["A photo of the Cats sitting on grass", "a red dog", "a " * 20])
    assert ids.shape == (3, CTX)
    real = ids[(ids != 0)]
    assert (real == hft.unk_token_id).float().mean() < 0.1, ids  # the vocabulary really loaded
    assert ids[0, :6].tolist() == [2, 5, 6, 7, 8, 9]  # [CLS] a photo of the cat
    assert not (ids == hft.sep_token_id).any()  # strip_sep_token took effect (SEP -> 0), also when truncated
    assert (ids[:, -1] == 0).all()  # so "last" pooling always reads a pad slot that attends to the caption

    model = open_clip.CLIP(**cfg).eval()
    # --- text: bidirectional, no pad mask, last-position pooling
    assert model.attn_mask is None
    assert model.text_pool_type == "last"
    causal = open_clip.CLIP(**_tiny(recap_clip_config("S-16", "small", context_length=CTX, style="openai"))).eval()
    assert causal.attn_mask is not None  # the control: classic tower is causal

    def token_states(m, t):
        x = m.token_embedding(t) + m.positional_embedding
        return m.ln_final(m.transformer(x, attn_mask=m.attn_mask))

    with torch.no_grad():
        a = ids[1:2].clone()  # [CLS] a red dog 0 ...
        b = a.clone()
        b[0, 3] = WORDS.index("cat") + 5  # change a LATE real token
        sa, sb = token_states(model, a), token_states(model, b)
        assert not torch.allclose(sa[0, 1], sb[0, 1])  # an EARLIER position sees it: bidirectional
        ca, cb = token_states(causal, a), token_states(causal, b)
        assert torch.allclose(ca[0, :3], cb[0, :3])
        assert not torch.allclose(ca[0, 3], cb[0, 3])

        emb = model.encode_text(ids)
        manual = token_states(model, ids)[:, -1] @ model.text_projection
        torch.testing.assert_close(emb, manual)  # pooled = final position, projected
        # the first token ([CLS]) still reaches the pooled vector; so do pad slots (open_clip 3.3's CLIP has no pad
        # mask: `use_pad_mask` is not a CLIPTextCfg key and CLIP.encode_text only passes the (None) causal mask)
        c = a.clone()
        c[0, 0] = WORDS.index("grass") + 5
        assert not torch.allclose(model.encode_text(a), model.encode_text(c))
        d = a.clone()
        d[0, 6] = WORDS.index("grass") + 5  # a pad slot in the middle of the padding
        assert not torch.allclose(model.encode_text(a), model.encode_text(d))
    with pytest.raises(TypeError, match="use_pad_mask"):
        open_clip.CLIP(**{**cfg, "text_cfg": {**tcfg, "use_pad_mask": True}})

    # --- vision: no ln_pre, GAP over patch tokens, LN after pooling
    v = model.visual
    assert v.pool_type == "avg"
    assert v.final_ln_after_pool
    assert isinstance(v.ln_pre, torch.nn.Identity)
    assert causal.visual.pool_type == "tok"
    assert isinstance(causal.visual.ln_pre, torch.nn.LayerNorm)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.encode_image(img)
        x = v.transformer(v._embeds(img))  # [B, 1 + 16, width]; class token stays in the sequence
        gap = v.ln_post(x[:, 1:].mean(dim=1)) @ v.proj
        tok_pool = v.ln_post(x[:, 0]) @ v.proj
    assert out.shape == (2, 16)
    torch.testing.assert_close(out, gap)
    assert not torch.allclose(out, tok_pool, atol=1e-3)
