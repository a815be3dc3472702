"""Two real processes (gloo, CPU): the gathered contrastive loss equals the single-process loss on the global batch.

Each rank holds one half of a fixed global batch and the same tiny open_clip model (fp64, one state dict loaded by
every process). With ``make_clip_loss(rank, 2)`` (open_clip's ``local_loss=True, gather_with_grad=True``):

* the mean of the per-rank losses is the single-process loss of the concatenated batch (``make_clip_loss(0, 1)``);
* the gradients averaged across ranks (what DDP does: all_reduce SUM / world) are the single-process gradients;
* ``ClipModule.training_step`` with the rank's loss (what ``ClipModule.setup`` installs under a trainer) gives the
  same losses and gradients.

Negative control: with ``gather_with_grad=False`` the loss is unchanged but the gradients are not (each rank only
back-propagates through its own rows), so the gradient check above can see that bug.

One start of two processes (``torch.multiprocessing``, forkserver) runs every case; the ranks write their results to
``tmp_path`` and the tests compare.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed as dist
from conftest import init_gloo, run_ranks
from open_clip import ClipLoss

from lightning_modules.clip import ClipModule, make_clip_loss

WORLD = 2
GLOBAL_BATCH = 8
CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
TOL = {"rtol": 1e-9, "atol": 1e-12}  # fp64 throughout; the collectives only reorder a handful of sums


def _model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = open_clip.CLIP(**CFG, output_dict=True).double()
    model.load_state_dict(state)
    return model.train()


def _loss_and_grads(model: torch.nn.Module, loss_fn, image, text) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(image, text)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _ddp_average(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for g in grads.values():
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        g /= dist.get_world_size()
    return grads


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        inputs = torch.load(Path(out_dir) / "inputs.pt")
        rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        image, text = inputs["image"][rows], inputs["text"][rows]
        results = {}
        losses = {
            "gather_with_grad": make_clip_loss(rank, WORLD),
            "gather_without_grad": ClipLoss(local_loss=True, gather_with_grad=False, rank=rank, world_size=WORLD),
        }
        for name, loss_fn in losses.items():
            loss, grads = _loss_and_grads(_model(inputs["state"]), loss_fn, image, text)
            results[name] = {"loss": loss, "grads": _ddp_average(grads)}

        # The ClipModule path: the loss ClipModule.setup installs under a trainer, then its own training_step.
        module = ClipModule(model=CFG, lr=1e-3, weight_decay=0.1)
        module.model.load_state_dict(inputs["state"])
        module.double().train()
        module.loss_fn = make_clip_loss(rank, WORLD)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = module.training_step({"image": image, "text": text, "key": ["k"] * len(image)}, 0)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in module.model.named_parameters()}
        results["clip_module"] = {
            "loss": loss.detach(),
            "grads": _ddp_average(grads),
            "warnings": sorted({str(w.message) for w in caught}),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Single-process reference on the global batch, and the two ranks' results on its halves."""
    out_dir = tmp_path_factory.mktemp("clip_dist")
    torch.manual_seed(0)
    state = open_clip.CLIP(**CFG, output_dict=True).double().state_dict()
    size, ctx, vocab = CFG["vision_cfg"]["image_size"], CFG["text_cfg"]["context_length"], CFG["text_cfg"]["vocab_size"]
    inputs = {
        "state": state,
        "image": torch.randn(GLOBAL_BATCH, 3, size, size, dtype=torch.float64),
        "text": torch.randint(1, vocab, (GLOBAL_BATCH, ctx)),
    }
    torch.save(inputs, out_dir / "inputs.pt")

    ranks = run_ranks(_rank_main, out_dir, WORLD)

    ref_loss, ref_grads = _loss_and_grads(_model(state), make_clip_loss(0, 1), inputs["image"], inputs["text"])
    half = GLOBAL_BATCH // WORLD
    local_only, _ = _loss_and_grads(_model(state), make_clip_loss(0, 1), inputs["image"][:half], inputs["text"][:half])
    return {"ranks": ranks, "loss": ref_loss, "grads": ref_grads, "rank0_local_only_loss": local_only}


def _mean_loss(ranks, case: str) -> torch.Tensor:
    return torch.stack([r[case]["loss"] for r in ranks]).mean()


def _max_grad_diff(ranks, case: str, ref_grads) -> dict[str, float]:
    return {n: (ranks[0][case]["grads"][n] - g).abs().max().item() for n, g in ref_grads.items()}


@pytest.mark.parametrize("case", ["gather_with_grad", "clip_module"])
def test_mean_rank_loss_is_global_batch_loss(two_ranks, case):
    ranks = two_ranks["ranks"]
    torch.testing.assert_close(_mean_loss(ranks, case), two_ranks["loss"], **TOL)
    # each rank really scored against the other rank's columns (not just its own half)
    assert abs(ranks[0][case]["loss"].item() - two_ranks["rank0_local_only_loss"].item()) > 1e-3


@pytest.mark.parametrize("case", ["gather_with_grad", "clip_module"])
def test_ddp_averaged_grads_are_global_batch_grads(two_ranks, case):
    ranks = two_ranks["ranks"]
    assert set(ranks[0][case]["grads"]) == set(two_ranks["grads"])
    for name, ref in two_ranks["grads"].items():
        for r in ranks:  # after the all_reduce every rank holds the same averaged gradient
            torch.testing.assert_close(r[case]["grads"][name], ref, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    assert all(two_ranks["grads"][n].abs().max() > 0 for n in ("logit_scale", "visual.conv1.weight"))


def test_clip_module_training_step_runs_without_trainer(two_ranks):
    # training_step's self.log calls need no trainer: without one Lightning warns and drops the values (no stub)
    for r in two_ranks["ranks"]:
        assert any("self.log()" in w for w in r["clip_module"]["warnings"]), r["clip_module"]["warnings"]


def test_negative_control_gather_without_grad(two_ranks):
    ranks = two_ranks["ranks"]
    # the forward is the same global-batch loss ...
    torch.testing.assert_close(_mean_loss(ranks, "gather_without_grad"), two_ranks["loss"], **TOL)
    # ... but the other rank's features get no gradient, so the averaged gradients are wrong (by far more than TOL)
    diff = _max_grad_diff(ranks, "gather_without_grad", two_ranks["grads"])
    wrong = {n for n, d in diff.items() if d > 1e-4 * max(1.0, two_ranks["grads"][n].abs().max().item())}
    assert {"visual.conv1.weight", "visual.proj", "text_projection", "token_embedding.weight"} <= wrong
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            ranks[0]["gather_without_grad"]["grads"]["text_projection"], two_ranks["grads"]["text_projection"], **TOL
        )
