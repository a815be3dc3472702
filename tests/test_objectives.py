"""The objectives beside ClipLoss (SigLIP, multi-caption contrastive, the caption decoder) against direct computations,
and ClipModule's wiring of them: its training step, its logged names, its checkpoints and the open_clip export."""

from __future__ import annotations

import json
import math

import lightning as L
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_trainer
from open_clip.loss import SigLipLoss
from torch.utils.data import DataLoader

from experiments.export_clip import export_clip
from lightning_modules.clip import ClipModule
from lightning_modules.components.clip_model import load_checkpoint_file
from lightning_modules.components.losses import (
    CaptionDecoder,
    caption_loss,
    make_clip_loss,
    make_contrastive_loss,
    multi_caption_loss,
    pad_token_id,
)

CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
SIGLIP = {"loss": "siglip", "init_logit_scale": math.log(10), "init_logit_bias": -10.0}
VIEWS = {"text_views": {"original": 1.0, "recaption": 0.5}}
DECODER = {
    "caption_decoder": {
        "weight": 0.7,
        "target": "recaption",
        "prefix": "original",
        "layers": 1,
        "width": 32,
        "heads": 2,
    }
}
OBJECTIVES = {"clip": {}, "siglip": SIGLIP, "views": VIEWS, "views_decoder": {**VIEWS, **DECODER}}


def tokens(g: torch.Generator, batch: int, lengths: list[int] | None = None, ctx: int = 16) -> torch.Tensor:
    """SOT, random ids, EOT (the highest id), then pads (0), as open_clip's tokenizer lays them out."""
    lengths = lengths or torch.randint(3, ctx - 1, (batch,), generator=g).tolist()
    out = torch.randint(1, 98, (batch, ctx), generator=g)
    out[:, 0] = 98
    for i, n in enumerate(lengths):
        out[i, n] = 99
        out[i, n + 1 :] = 0
    return out


def make_batch(seed: int = 0, batch: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    texts = {"original": tokens(g, batch), "recaption": tokens(g, batch)}
    return {"image": torch.randn(batch, 3, 32, 32, generator=g), "text": texts["original"], "texts": texts}


def module(**kw) -> ClipModule:
    torch.manual_seed(0)
    return ClipModule(model=CFG, lr=1e-3, weight_decay=0.1, **kw).double()


def double(batch: dict) -> dict:
    return {**batch, "image": batch["image"].double()}


def features(seed: int, n: int = 5, d: int = 8) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


# ------------------------------------------------------------------------------------------------------------ losses
def test_siglip_is_the_papers_sigmoid_loss():
    img, txt = features(0), features(1)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    # SigLIP (Zhai et al. 2023), Algorithm 1: -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)), z = 1 iff i = j
    want = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            want -= math.log(1 / (1 + math.exp(-z * (7.0 * float(img[i] @ txt[j]) - 3.0))))
    got = make_contrastive_loss("siglip")(img, txt, scale, bias)
    assert got.item() == pytest.approx(want / 5, rel=1e-12)
    with pytest.raises(ValueError, match="'sigmoid' is not one of clip, siglip"):
        make_contrastive_loss("sigmoid")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_multi_caption_is_the_weighted_sum_of_per_view_losses(kind):
    img, views = features(0), {"original": features(1), "recaption": features(2)}
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    weights = {"original": 0.3, "recaption": 1.5}
    loss_fn, extra = make_contrastive_loss(kind), (bias,) if kind == "siglip" else ()
    total, per_view = multi_caption_loss(loss_fn, img, views, weights, scale, *extra)
    if kind == "clip":  # ClipLoss written out: the mean of the two softmax cross-entropies over the pairs
        logits = scale * img @ views["recaption"].T
        labels = torch.arange(5)
        direct = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        torch.testing.assert_close(per_view["recaption"], direct)
    for v in weights:
        torch.testing.assert_close(per_view[v], loss_fn(img, views[v], scale, *extra))
    torch.testing.assert_close(total, 0.3 * per_view["original"] + 1.5 * per_view["recaption"])
    assert per_view["original"].item() != pytest.approx(per_view["recaption"].item())
    with pytest.raises(KeyError, match=r"text views \['partial'\] have no text features"):
        multi_caption_loss(loss_fn, img, views, {"partial": 1.0}, scale, *extra)


def test_caption_loss_is_per_sample_token_mean_ignoring_pads():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64)
    target = torch.tensor([[5, 3, 9, 0, 0, 0], [4, 4, 4, 4, 4, 2], [7, 0, 0, 0, 0, 0]])
    per_sample = []
    for b in range(3):
        terms = [-torch.log_softmax(logits[b, t], -1)[target[b, t]] for t in range(6) if target[b, t] != 0]
        per_sample.append(sum(terms) / len(terms))
    want = sum(per_sample) / 3
    torch.testing.assert_close(caption_loss(logits, target, pad_id=0), want)
    torch.testing.assert_close(caption_loss(logits[target != 0], target, pad_id=0), want)  # the kept rows only
    # what the logits say at pad positions cannot matter ...
    changed = logits.clone()
    changed[target == 0] = torch.randn(int((target == 0).sum()), 11, generator=g, dtype=torch.float64)
    torch.testing.assert_close(caption_loss(changed, target, pad_id=0), want)
    # ... and it is not the flat token mean (which would weigh the 6-token sample 6 times the 1-token one)
    flat = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=0)
    assert abs(flat.item() - want.item()) > 1e-3
    # another pad id: the id 0 is now a token
    assert caption_loss(logits, target, pad_id=10).item() != pytest.approx(want.item())


def test_pad_token_id_from_the_tokenizer(tmp_path):
    assert pad_token_id(open_clip.tokenizer.SimpleTokenizer(context_length=8)) == 0
    from transformers import BertTokenizer

    vocab = ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "a", "cat"]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp_path)
    assert pad_token_id(open_clip.tokenizer.HFTokenizer(str(tmp_path), context_length=8)) == 4


def test_decoder_masks_prefix_pads_and_is_causal():
    torch.manual_seed(0)
    dims = {"vocab_size": 50, "image_width": 24, "context_length": 10, "width": 16, "layers": 2, "heads": 2}
    dec = CaptionDecoder(**dims, pad_id=0, prefix=True)
    dec = dec.double().eval()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 4, 24, generator=g, dtype=torch.float64)
    inp = torch.randint(1, 50, (2, 9), generator=g)
    prefix = torch.tensor([[3, 8, 12, 0, 0, 0], [5, 6, 0, 0, 0, 0]])
    out = dec(image, inp, prefix)
    keep = inp > 25
    torch.testing.assert_close(dec(image, inp, prefix, keep=keep), out[keep])
    # more pads on the prefix change nothing (they are masked out of the cross-attention) ...
    torch.testing.assert_close(dec(image, inp, torch.cat([prefix, torch.zeros(2, 5, dtype=torch.long)], 1)), out)
    # ... while the prefix's tokens do matter, and so does the image
    assert (dec(image, inp, prefix.masked_fill(prefix == 8, 9)) - out).abs().max() > 1e-6
    assert (dec(image + 1, inp, prefix) - out).abs().max() > 1e-6
    # causal: position t does not see the inputs after it
    later = inp.clone()
    later[:, 5:] = (later[:, 5:] + 1) % 49 + 1
    changed = dec(image, later, prefix)
    torch.testing.assert_close(changed[:, :5], out[:, :5])
    assert (changed[:, 5:] - out[:, 5:]).abs().max() > 1e-6
    assert torch.isfinite(dec.transformer.text_projection).all()  # open_clip leaves it torch.empty


def test_shortlist_decoder_predicts_its_ids_and_one_other_class():
    torch.manual_seed(0)
    dims = {"vocab_size": 50, "image_width": 24, "context_length": 10, "width": 16, "layers": 1, "heads": 2}
    dec = CaptionDecoder(**dims, pad_id=0, output_ids=[7, 3, 9, 3]).double()
    assert dec.out_class.tolist()[:10] == [3, 3, 3, 0, 3, 3, 3, 1, 3, 2]  # ids 3, 7, 9 -> 0, 1, 2; the rest -> 3
    g = torch.Generator().manual_seed(1)
    image, inp = torch.randn(2, 4, 24, generator=g, dtype=torch.float64), torch.randint(1, 50, (2, 5), generator=g)
    logits = dec(image, inp)
    assert logits.shape == (2, 5, 4)
    target = torch.tensor([[3, 9, 11, 0, 0], [7, 7, 0, 0, 0]])  # 11 is not in the shortlist: "other"
    classes = torch.tensor([[0, 2, 3], [1, 1, 0]])
    want = sum(
        sum(-torch.log_softmax(logits[b, t], -1)[classes[b, t]] for t in range(n)) / n for b, n in ((0, 3), (1, 2))
    )
    torch.testing.assert_close(caption_loss(logits, target, 0, dec.out_class), want / 2)
    with pytest.raises(ValueError, match="output_ids"):
        CaptionDecoder(**dims, pad_id=0, output_ids=[3, 50])


def test_module_shortlist_is_the_vocab_files_tokens(tmp_path):
    (tmp_path / "a.txt").write_text("a red circle on the left\n")
    (tmp_path / "b.txt").write_text("a blue square. " * 20)  # longer than the context: read in chunks
    (tmp_path / "c.txt").write_text(" ".join(f"word{i}" for i in range(40)))
    cfg = json.loads(json.dumps(CFG))
    cfg["text_cfg"]["vocab_size"] = 49408  # open_clip's tokenizer
    decoder = {**DECODER["caption_decoder"], "vocab": str(tmp_path / "*.txt")}
    m = ClipModule(model=cfg, lr=1e-3, caption_decoder=decoder, text_views={"original": 1.0})
    want = set(m.tokenizer(["a red circle on the left a blue square.", "word39"]).unique().tolist()) - {0}
    shortlist = set((m.decoder.out_class < m.decoder.out_class.max()).nonzero().flatten().tolist())
    assert want <= shortlist
    assert 0 not in shortlist
    assert m.decoder.transformer.text_projection.shape[-1] == len(shortlist) + 1
    with pytest.raises(FileNotFoundError, match="caption_decoder.vocab"):
        ClipModule(model=cfg, lr=1e-3, caption_decoder={**decoder, "vocab": str(tmp_path / "*.none")})


# ------------------------------------------------------------------------------------------------- ClipModule wiring
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_training_step_is_the_objective_on_one_image_pass(objective):
    kw = OBJECTIVES[objective]
    m, batch = module(**kw), double(make_batch())
    calls = []
    m.model.visual.register_forward_hook(lambda *a: calls.append(1))
    loss = m.training_step(batch, 0)
    assert len(calls) == 1  # the decoder's image tokens come from the features' pass
    # the same objective computed here from the model's own encoders
    img = m.model.encode_image(batch["image"], normalize=True)
    scale = m.model.logit_scale.exp()
    views = kw.get("text_views", {"text": 1.0})
    per_view = {}
    for v in views:
        txt = m.model.encode_text(batch["text"] if v == "text" else batch["texts"][v], normalize=True)
        if objective == "siglip":
            per_view[v] = SigLipLoss()(img, txt, scale, m.model.logit_bias)
        else:
            per_view[v] = make_clip_loss()(img, txt, scale)
    want = sum(w * per_view[v] for v, w in views.items())
    if "caption_decoder" in kw:
        m.model.visual.output_tokens = True
        _, image_tokens = m.model.visual(batch["image"])
        m.model.visual.output_tokens = False
        target, prefix = batch["texts"]["recaption"], batch["texts"]["original"]
        want = want + 0.7 * caption_loss(m.decoder(image_tokens, target[:, :-1], prefix), target[:, 1:], 0)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert m.model.visual.conv1.weight.grad.abs().max() > 0
    assert m.decoder is None or all(p.grad is not None for p in m.decoder.parameters())  # DDP needs every one
    # the tower's token switch is back off: encode_image (evaluation, export) gives plain features
    assert m.encode_images(batch["image"]).shape == (6, 32)


def test_decoder_gradient_reaches_the_image_tower():
    m, batch = module(caption_decoder={**DECODER["caption_decoder"], "prefix": None}), double(make_batch())
    out = m._encode_with_tokens(batch["image"], batch["text"])
    target = batch["texts"]["recaption"]
    caption_loss(m.decoder(out["image_tokens"], target[:, :-1], None), target[:, 1:], 0).backward()
    for name in ("visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight"):
        assert m.model.get_parameter(name).grad.abs().max() > 0, name
    assert m.model.text_projection.grad is None  # the decoder alone does not touch the text tower
    # without a prefix every decoder parameter gets a gradient (DDP stops on one that does not)
    assert all(p.grad is not None for p in m.decoder.parameters())


def test_decoder_parameters_are_optimized_but_not_exported_model():
    m = module(**DECODER)
    grouped = {id(p) for group in m._named_param_groups() for _, p in group}
    assert {id(p) for p in m.decoder.parameters()} <= grouped
    assert not any(k.startswith("decoder") for k in m.model.state_dict())
    names = {n for n, _ in m._named_param_groups()[1]}
    assert "decoder.image_proj.bias" in names and "decoder.image_proj.weight" not in names  # noqa: PT018


def test_bad_objective_settings_are_named():
    with pytest.raises(ValueError, match="siglip needs a logit bias: set init_logit_bias"):
        ClipModule(model=CFG, lr=1e-3, loss="siglip")
    with pytest.raises(ValueError, match=r"caption_decoder: unknown keys \['depth'\], missing \['layers'\]"):
        ClipModule(model=CFG, lr=1e-3, caption_decoder={"target": "text", "width": 8, "heads": 2, "depth": 1})
    with pytest.raises(ValueError, match="init_logit_bias is for loss: siglip; loss: clip has no logit bias"):
        ClipModule(model=CFG, lr=1e-3, init_logit_bias=-10.0)
    with pytest.raises(ValueError, match="text_views is empty"):
        ClipModule(model=CFG, lr=1e-3, text_views={})
    from datamodules.checks import ConfigError, RunContext

    with pytest.raises(ConfigError, match="loss is not one of clip, siglip, got 'sigmoid'"):
        ClipModule.validate_config({"model": CFG, "loss": "sigmoid"}, RunContext())
    with pytest.raises(ConfigError, match="caption_decoder has keys other than"):
        ClipModule.validate_config({"model": CFG, "caption_decoder": {"target": "text", "depth": 2}}, RunContext())
    m = module(text_views={"original": 1.0, "partial": 1.0})
    with pytest.raises(KeyError, match=r"view 'partial' is not in batch\['texts'\] \(\['original', 'recaption'\]\)"):
        m.training_step(double(make_batch()), 0)


class HandMadeData(L.LightningDataModule):
    """The batch layout of the caption-mix DataModule with views (``text``, ``texts``), made by hand."""

    def train_dataloader(self):
        batches = [make_batch(seed) for seed in range(3)]
        return DataLoader(batches, batch_size=None)


def test_fit_logs_each_term_and_exports_a_plain_open_clip_model(tmp_path):
    m = ClipModule(model=CFG, lr=1e-3, weight_decay=0.1, **SIGLIP, **VIEWS, **DECODER)
    trainer = cpu_trainer(max_steps=3, log_every_n_steps=1)
    trainer.fit(m, datamodule=HandMadeData())
    logged = set(trainer.callback_metrics)
    want = {"train/loss", "train/loss_contrastive", "train/loss_original", "train/loss_recaption", "train/loss_decoder"}
    want.add("train/logit_bias")
    assert want <= logged, logged
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    state = load_checkpoint_file(ckpt)["state_dict"]  # weights_only=True
    assert any(k.startswith("decoder.") for k in state) and "model.logit_bias" in state  # noqa: PT018

    # a resumed module restores the decoder; init_from (stage 2) and export-clip take the CLIP weights only
    resumed = ClipModule.load_from_checkpoint(ckpt, weights_only=True)
    torch.testing.assert_close(resumed.decoder.image_proj.weight, m.decoder.image_proj.weight)
    stage2 = ClipModule(model=CFG, lr=1e-3, init_from=str(ckpt), **SIGLIP)
    torch.testing.assert_close(stage2.model.logit_bias, m.model.logit_bias)
    out = export_clip(ckpt, tmp_path / "export")
    loaded, _ = open_clip.create_model_from_pretrained(f"local-dir:{out}")
    assert loaded.logit_bias is not None and loaded.logit_bias.item() == pytest.approx(m.model.logit_bias.item())  # noqa: PT018
    images = make_batch(5)["image"]
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_image(images, normalize=True), m.encode_images(images))


def test_objective_step_benchmark_times_every_objective_against_clip_loss(tmp_path, capsys):
    from benchmarks import objective_step

    threads = torch.get_num_threads()
    history = tmp_path / "history.jsonl"
    args = ["--steps", "2", "--skip-steps", "1", "--batch-size", "2", "--repeats", "1", "--record", str(history)]
    report = objective_step.main(args)
    assert set(report["results"]) == set(objective_step.OBJECTIVES)
    clip = report["results"]["clip"]["ms_per_step"]
    for row in report["results"].values():
        assert row["ms_per_step"] > 0
        assert row["ratio"] == pytest.approx(row["ms_per_step"] / clip, rel=1e-3)
    assert json.loads(history.read_text().splitlines()[-1])["results"] == report["results"]
    assert "views2+decoder" in capsys.readouterr().out
    assert torch.get_num_threads() == threads
