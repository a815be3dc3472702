"""Two real processes (gloo, CPU, fp64): SigLIP, the multi-caption sum and the caption-decoder loss under DDP equal
their single-process values on the global batch, as ``tests/test_clip_distributed.py`` shows for ClipLoss.

Each rank holds one half of a fixed global batch and the same ClipModule weights, runs ``ClipModule.training_step``
with the rank's contrastive loss (what ``ClipModule.setup`` installs under a trainer) and all-reduces its gradients
as DDP does (SUM / world). The mean of the rank losses and the averaged gradients must be the single-process loss
and gradients of the whole batch:

* ``siglip``: open_clip's SigLipLoss passes the texts round the ring with gradients and divides by the local batch,
  so the mean over ranks is the global sum over B x B pairs / B exactly;
* ``views``: the weighted sum of two views' ClipLoss (linear in ClipLoss, whose gather is tested there);
* ``decoder``: the caption-decoder loss alone (per-sample token means, then the mean over samples);
* ``all``: SigLIP + two views + the prefixed decoder, the whole Table 8 "decoder" step.

Negative controls: SigLIP without the exchange (``world_size=1`` on each rank) gives another loss and other
gradients; a flat token-mean decoder loss is not the global one when the ranks' captions differ in length (the
reason ``caption_loss`` averages per sample). The multi-caption sum has no control of its own: it can only go wrong
through ClipLoss's gather, whose control is in ``test_clip_distributed.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import init_gloo, run_ranks
from test_objectives import CFG, DECODER, SIGLIP, VIEWS, make_batch

from lightning_modules.clip import ClipModule
from lightning_modules.components.losses import caption_loss, make_contrastive_loss

WORLD, GLOBAL_BATCH = 2, 8
TOL = {"rtol": 1e-9, "atol": 1e-12}
CASES = {"siglip": SIGLIP, "views": VIEWS, "decoder": DECODER, "all": {**SIGLIP, **VIEWS, **DECODER}}


def _module(case: str, state: dict[str, torch.Tensor]) -> ClipModule:
    m = ClipModule(model=CFG, lr=1e-3, **CASES[case])
    m.load_state_dict(state)
    return m.double().train()


def _decoder_loss(m: ClipModule, batch: dict, flat: bool = False) -> torch.Tensor:
    out = m._encode_with_tokens(batch["image"], batch["text"])
    target, prefix = batch["texts"]["recaption"], batch["texts"]["original"]
    logits = m.decoder(out["image_tokens"], target[:, :-1], prefix)
    if flat:  # the negative control: one mean over all of the rank's tokens
        return F.cross_entropy(logits.transpose(1, 2), target[:, 1:], ignore_index=0)
    return caption_loss(logits, target[:, 1:], 0)


def _step(case: str, state, batch, rank: int, world: int, variant: str = "") -> tuple[torch.Tensor, dict]:
    m = _module(case, state)
    if case == "decoder":
        loss = _decoder_loss(m, batch, flat=variant == "flat")
    else:
        m.loss_fn = make_contrastive_loss(m.hparams.loss, rank, world)
        loss = m.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def _rows(batch: dict, rows: slice) -> dict:
    return {
        "image": batch["image"][rows],
        "text": batch["text"][rows],
        "texts": {k: v[rows] for k, v in batch["texts"].items()},
    }


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        inputs = torch.load(Path(out_dir) / "inputs.pt")
        half = GLOBAL_BATCH // WORLD
        batch = _rows(inputs["batch"], slice(rank * half, (rank + 1) * half))
        results = {}
        runs = [(case, "", rank, WORLD) for case in CASES] + [("siglip", "local", 0, 1), ("decoder", "flat", 0, 1)]
        for case, variant, r, world in runs:
            loss, grads = _step(case, inputs["states"][case], batch, r, world, variant)
            for g in grads.values():  # what DDP does with the gradients
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= WORLD
            results[case + variant] = {"loss": loss, "grads": grads}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("objectives_dist")
    batch = make_batch(seed=3, batch=GLOBAL_BATCH)
    batch["image"] = batch["image"].double()
    # rank 0's recaptions short, rank 1's long: a flat token mean would weigh the ranks unequally
    recap = batch["texts"]["recaption"]
    recap[: GLOBAL_BATCH // 2, 4:] = 0
    recap[: GLOBAL_BATCH // 2, 3] = 99
    states = {}
    for case in CASES:
        torch.manual_seed(0)
        states[case] = ClipModule(model=CFG, lr=1e-3, **CASES[case]).double().state_dict()
    torch.save({"batch": batch, "states": states}, out_dir / "inputs.pt")

    ranks = run_ranks(_rank_main, out_dir, WORLD)
    ref = {case: _step(case, states[case], batch, 0, 1) for case in CASES}
    ref["decoderflat"] = _step("decoder", states["decoder"], batch, 0, 1, "flat")
    return ranks, ref


@pytest.mark.parametrize("case", list(CASES))
def test_mean_rank_loss_and_averaged_grads_are_the_global_batchs(two_ranks, case):
    ranks, ref = two_ranks
    ref_loss, ref_grads = ref[case]
    torch.testing.assert_close(torch.stack([r[case]["loss"] for r in ranks]).mean(), ref_loss, **TOL)
    assert abs(ranks[0][case]["loss"].item() - ranks[1][case]["loss"].item()) > 1e-6  # the halves differ
    assert set(ranks[0][case]["grads"]) == set(ref_grads)
    for name, g in ref_grads.items():
        for r in ranks:
            torch.testing.assert_close(r[case]["grads"][name], g, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert ref_grads["model.visual.conv1.weight"].abs().max() > 0
    if "caption_decoder" in CASES[case]:
        assert ref_grads["decoder.image_proj.weight"].abs().max() > 0


def test_negative_control_siglip_without_the_exchange(two_ranks):
    ranks, ref = two_ranks
    ref_loss, ref_grads = ref["siglip"]
    local = torch.stack([r["sigliplocal"]["loss"] for r in ranks]).mean()
    # the other rank's negatives are missing; at SigLIP's init (bias -10) a negative pair adds only ~log(1 + e^-10)
    # = 4.5e-5 (16 pairs / 4 rows per rank: ~1e-4), still thousands of times the equivalence tolerance
    assert abs(local.item() - ref_loss.item()) > 1e-5
    name = "model.text_projection"
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ranks[0]["sigliplocal"]["grads"][name], ref_grads[name], **TOL)


def test_negative_control_flat_token_mean_decoder_loss(two_ranks):
    ranks, ref = two_ranks
    flat_mean = torch.stack([r["decoderflat"]["loss"] for r in ranks]).mean()
    assert abs(flat_mean.item() - ref["decoderflat"][0].item()) > 1e-4
