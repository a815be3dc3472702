"""Mid-epoch resume of the caption-mix loader (loader level and a killed tiny CLIP run) and step checkpointing."""

from __future__ import annotations

import copy
import io
import itertools
import json
import tarfile
from pathlib import Path

import conftest
import lightning as L
import numpy as np
import pytest
import torch
from conftest import cpu_trainer, write_shards

from datamodules.caption_mix import POSITION_KEY, CaptionMixDataModule
from lightning_modules.checkpointing import AtomicCheckpointIO, StepCheckpoint


def make_dm(shards: dict, **kw) -> CaptionMixDataModule:
    """conftest's DataModule with a caption mix (p = 0.5) and a random crop, the parts a resume must reproduce."""
    return conftest.make_dm(shards, **{"p_original": 0.5, "image_transform": random_crop, **kw})


def random_crop(img) -> torch.Tensor:
    """A random transform (as CLIP's RandomResizedCrop): a resumed stream must redraw exactly the same numbers."""
    x = torch.from_numpy(np.asarray(img, dtype="float32")).permute(2, 0, 1)
    dy, dx = torch.randint(0, 5, (2,)).tolist()
    return x[:, dy : dy + 8, dx : dx + 8] + torch.rand(1)


def run_from(loader, epoch: int, n: int | None = None) -> list[dict]:
    """Iterate ``loader`` from ``epoch`` on; ``n`` batches in all (crossing epochs), or one epoch."""
    out = []
    for e in itertools.count(epoch):
        loader.set_epoch(e)
        for batch in loader:
            out.append(batch)
            if n is not None and len(out) == n:
                return out
        if n is None:
            return out
    raise AssertionError


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert [x["caption"] for x in a] == [x["caption"] for x in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"])  # the random crops too
        assert x["skipped"]["counts"] == y["skipped"]["counts"]


# -------------------------------------------------------------------------------------------------- loader level
@pytest.mark.parametrize(
    ("workers", "kw"),
    [(0, {}), (2, {}), (2, {"resampled": True}), (2, {"persistent_workers": False})],
    ids=["0workers", "2workers", "2workers-resampled", "2workers-not-persistent"],
)
def test_loader_resumes_mid_epoch_and_across_the_epoch_boundary(tiny_shards, workers, kw):
    dm = make_dm(tiny_shards, num_workers=workers, **kw)
    per_epoch = len(dm.train_dataloader())  # 72 samples / 4 = 18
    whole = run_from(dm.train_dataloader(), 0, n=per_epoch + 6)
    for cut in (5, per_epoch - 1):  # mid-epoch 0; one batch before the epoch ends (the rest crosses into epoch 1)
        first = make_dm(tiny_shards, num_workers=workers, **kw).train_dataloader()
        first.set_epoch(0)
        seen = list(itertools.islice(iter(first), cut))
        state = first.state_dict()
        assert (state["epoch"], state["batches"]) == (0, cut)
        fresh = make_dm(tiny_shards, num_workers=workers, **kw).train_dataloader()
        fresh.load_state_dict(state)
        rest = list(fresh)  # the rest of epoch 0 ...
        rest += run_from(fresh, 1, n=6)  # ... then epoch 1 from its start
        same_batches(seen + rest, whole)
        assert not any(POSITION_KEY in b for b in rest)  # the loader's bookkeeping never reaches the model


def test_state_at_the_end_of_an_epoch_starts_the_next(tiny_shards):
    dm = make_dm(tiny_shards, num_workers=2)
    loader = dm.train_dataloader()
    epoch0 = run_from(loader, 0)
    state = loader.state_dict()
    assert (state["epoch"], state["batches"]) == (0, len(epoch0))
    fresh = make_dm(tiny_shards, num_workers=2).train_dataloader()
    fresh.load_state_dict(state)
    same_batches(list(fresh), run_from(make_dm(tiny_shards, num_workers=2).train_dataloader(), 1))


def break_images(root: Path, indices: set[int]) -> None:
    """Truncate the jpg of samples ``indices`` of every shard (undecodable images the loader drops after the
    shuffle buffer, so the drop positions are only known by decoding)."""
    for src in sorted(root.glob("*.tar")):
        members = []
        with tarfile.open(src) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".jpg") and int(m.name.split(".", 1)[0][-4:]) in indices:
                    data = data[: len(data) // 3]
                members.append((m, data))
        with tarfile.open(src, "w") as tar:
            for m, data in members:
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))


def test_other_ranks_resume_exactly_from_rank0s_checkpoint_with_broken_images(tmp_path):
    """DDP: only rank 0 writes the checkpoint. A rank whose positions are not in it still resumes exactly from
    (epoch, batches), even when undecodable images were dropped in the part it replays."""
    write_shards(tmp_path / "web", [24, 16, 20, 12, 18, 22], sidecar_dir=tmp_path / "sidecars")
    break_images(tmp_path / "web", {1, 3, 4, 9})
    shards = {"web": tmp_path / "web", "sidecars": tmp_path / "sidecars"}
    kw = dict(train_shards=str(tmp_path / "web" / "{00000..00005}.tar"), world_size=2, num_workers=2)

    def loader(rank):
        return make_dm(shards, rank=rank, **kw).train_dataloader()

    cut = 5
    rank0 = loader(0)
    list(itertools.islice(iter(rank0), cut))
    state = rank0.state_dict()
    assert list(state["positions"]) == ["0"]  # no process group here: rank 0 knows only its own positions
    for rank in (0, 1):  # rank 0: exact positions (no decoding); rank 1: decodes the replayed images
        whole = run_from(loader(rank), 0)
        assert sum(b["skipped"]["counts"].get("bad_image", 0) for b in whole[:cut]) > 0  # drops in the replay
        fresh = loader(rank)
        fresh.load_state_dict(state)
        same_batches(list(fresh), whole[cut:])


def test_load_state_refuses_other_data_settings(tiny_shards):
    loader = make_dm(tiny_shards, num_workers=2).train_dataloader()
    list(itertools.islice(iter(loader), 3))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="num_workers: checkpoint 2, now 1"):
        make_dm(tiny_shards, num_workers=0).train_dataloader().load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make_dm(tiny_shards, num_workers=2, seed=8).train_dataloader().load_state_dict(state)


# ------------------------------------------------------------------------------------------- a killed CLIP run
class Preempted(Exception):
    """The job is killed (not KeyboardInterrupt: Lightning turns that into sys.exit and ignores SIGINT after it)."""


class Record(L.Callback):
    def __init__(self, kill_at: int | None = None):
        self.keys, self.losses, self.kill_at = [], [], kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            raise Preempted  # nothing of this step is trained or saved
        self.keys.append(list(batch["key"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def clip_fit(shards: Path, root: Path, record: Record, module, ckpt_path: str | None = None, max_steps: int = 13):
    dm = CaptionMixDataModule(
        train_shards=str(shards),
        batch_size=8,
        sources={"original": "txt"},
        num_workers=2,
        shuffle_buffer=16,
        shuffle_initial=8,
        seed=3,
    )
    checkpoint = StepCheckpoint(every_n_train_steps=2, keep_last=2, dirpath=str(root / "ckpt"))
    trainer = cpu_trainer(
        max_steps=max_steps,
        callbacks=[record, checkpoint],
        enable_checkpointing=True,
        deterministic=True,
        default_root_dir=str(root),
    )
    trainer.fit(copy.deepcopy(module), datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_killed_clip_run_resumes_with_the_same_samples_and_losses(tmp_path):
    """The issue's test. 72 samples / batch 8 = 9 steps per epoch, 13 steps, a step checkpoint every 2 steps (keep
    2). The run is killed before step 11 (in epoch 1) and resumed from ``last`` (step 10): the resumed run sees the
    uninterrupted run's keys in the same order and the same losses. Also: only the last 2 step checkpoints remain,
    plus a loadable ``last.ckpt`` of the final (off-grid) step 13 that carries the loader state."""
    from test_clip import tiny_cfg

    from lightning_modules.clip import ClipModule

    write_shards(tmp_path / "web", [24, 16, 20, 12], image_size=32)
    torch.manual_seed(0)
    module = ClipModule(tiny_cfg(), lr=1e-3, warmup_samples=16)
    whole = Record()
    trainer = clip_fit(tmp_path / "web", tmp_path / "whole", whole, module)
    assert len(whole.keys) == 13
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    names = sorted(p.name for p in (tmp_path / "whole/ckpt").iterdir())
    assert names == ["last.ckpt", "step00000012.ckpt", "step00000013.ckpt"]  # steps 2..12 + the final 13, last 2
    last = torch.load(tmp_path / "whole/ckpt/last.ckpt", weights_only=True)
    assert last["global_step"] == 13
    loader_state = last["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["batches"]) == (1, 13 - 9)

    killed = Record(kill_at=10)  # global_step 10 = the 11th batch
    with pytest.raises(Preempted):
        clip_fit(tmp_path / "web", tmp_path / "run", killed, module)
    assert torch.load(tmp_path / "run/ckpt/last.ckpt", weights_only=True)["global_step"] == 10
    assert len(killed.keys) == 10

    resumed = Record()
    trainer = clip_fit(tmp_path / "web", tmp_path / "run", resumed, module, ckpt_path="last")
    assert trainer.global_step == 13
    assert killed.keys + resumed.keys == whole.keys
    assert torch.allclose(torch.tensor(killed.losses + resumed.losses), torch.tensor(whole.losses))
    assert sorted(p.name for p in (tmp_path / "run/ckpt").iterdir()) == names  # keep-last-2 across the restart


# ----------------------------------------------------------------------------------------- step checkpointing
def test_a_crash_while_saving_leaves_the_previous_last_ckpt_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "w": torch.ones(1000)}, path)
    before = path.read_bytes()

    real_save = torch.save

    def dies_midway(obj, f, *a, **kw):
        real_save({"global_step": 6, "w": torch.zeros(1000)}, f)  # some bytes reach the disk ...
        f.flush()
        raise OSError("No space left on device")  # ... then the job dies

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"global_step": 6, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------------------ DDP
class KeysPerRank(L.LightningModule):
    """A scalar model that appends each step's keys to ``rank<R>.jsonl`` (kept when the run is killed)."""

    def __init__(self, out_dir: str, kill_at: int | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.out_dir, self.kill_at = out_dir, kill_at

    def on_train_batch_start(self, batch, batch_idx):
        if self.kill_at is not None and self.global_step == self.kill_at:
            raise Preempted

    def training_step(self, batch, batch_idx):
        with open(Path(self.out_dir) / f"rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(batch["key"]) + "\n")
        return (self.w - len(batch["key"])) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_ddp_two_ranks_resume_exactly_from_rank0s_checkpoint(tmp_path):
    """Two gloo ranks, 2 workers each: only rank 0 writes the checkpoint, so the loader state gathers every rank's
    positions; killed in epoch 1 and resumed from ``last``, each rank sees its uninterrupted key sequence."""
    write_shards(tmp_path / "web", [24, 16, 20, 12, 8, 28], sidecar_dir=tmp_path / "side")

    def fit(out: Path, kill_at=None, ckpt_path=None):
        out.mkdir(exist_ok=True)
        dm = make_dm(
            {"web": tmp_path / "web", "sidecars": tmp_path / "side"},
            image_transform=None,
            train_shards=str(tmp_path / "web"),
            num_workers=2,
        )
        checkpoint = StepCheckpoint(every_n_train_steps=2, keep_last=1, dirpath=str(tmp_path / "ckpt" / out.name))
        trainer = cpu_trainer(
            devices=2, strategy="ddp_spawn", max_steps=16, callbacks=[checkpoint], enable_checkpointing=True
        )
        trainer.fit(KeysPerRank(str(out), kill_at), datamodule=dm, ckpt_path=ckpt_path)

    def keys(out: Path, rank: int) -> list:
        return [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]

    fit(tmp_path / "whole")  # 108 samples / (4 x 2 ranks) = 13 steps per epoch
    with pytest.raises(Exception, match="Preempted"):
        fit(tmp_path / "run", kill_at=15)
    state = torch.load(tmp_path / "ckpt/run/last.ckpt", weights_only=True)
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["batches"]) == (1, 14 - 13)
    assert sorted(loader_state["positions"]) == ["0", "1"]  # gathered from both ranks
    fit(tmp_path / "run", ckpt_path=str(tmp_path / "ckpt/run/last.ckpt"))
    for rank in (0, 1):
        whole, run = keys(tmp_path / "whole", rank), keys(tmp_path / "run", rank)
        assert len(whole) == 16
        assert run[:14] + run[15:] == whole  # step 15 of the killed run was recorded, then lost with the kill
