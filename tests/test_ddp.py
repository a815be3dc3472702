"""Two real processes (gloo, CPU): disjoint shards, equal batch counts, per-epoch caption draws, no hang."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import cpu_trainer, write_shards

from datamodules.caption_mix import CaptionMixDataModule
from datamodules.wds_stages import uniform_from_key


class RecordKeys(L.LightningModule):
    """Trains a single scalar and records, per rank and epoch, which keys/sources it saw."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.out_dir = out_dir
        self.seen: list[tuple[int, str, str]] = []

    def training_step(self, batch, batch_idx):
        self.seen += [(self.current_epoch, k, s) for k, s in zip(batch["key"], batch["caption_source"], strict=True)]
        return (self.w - len(batch["image"])) ** 2  # images stay PIL: no transform was given

    def on_train_end(self):
        path = Path(self.out_dir) / f"rank{self.global_rank}.json"
        path.write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_ddp_two_ranks(tmp_path):
    truth = write_shards(tmp_path / "web", [24, 16, 20, 12, 8, 28], sidecar_dir=tmp_path / "side")
    dm = CaptionMixDataModule(
        train_shards=str(tmp_path / "web"),
        sidecar_dir=str(tmp_path / "side"),
        batch_size=4,
        p_original=0.5,
        num_workers=1,
        shuffle_buffer=8,
        seed=5,
    )
    trainer = cpu_trainer(devices=2, strategy="ddp_spawn", max_epochs=2)
    trainer.fit(RecordKeys(str(tmp_path)), datamodule=dm)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    per_epoch = 108 // (4 * 2) * 4  # samples per rank per epoch
    for rank_seen in seen:
        assert [sum(e == epoch for e, _, _ in rank_seen) for epoch in (0, 1)] == [per_epoch, per_epoch]
    for epoch in (0, 1):
        keys = [{k for e, k, _ in rank_seen if e == epoch} for rank_seen in seen]
        assert keys[0]
        assert keys[1]
        assert not keys[0] & keys[1]
    for rank_seen in seen:
        for epoch, key, source in rank_seen:
            # the epoch reached the workers through the loader's sampler.set_epoch
            assert source == ("original" if uniform_from_key(5, epoch, key) < 0.5 else "recaption")
            assert key in truth
