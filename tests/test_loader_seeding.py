"""Per-sample seeding of the caption-mix loader's random transforms (made cheap for benchmarks/loader.py).

The transforms are seeded once per sample from its stream position; the training process's own RNGs are put back
after each batch when the transforms run there (num_workers=0), and workers skip the save/restore.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from conftest import make_dm
from torch.utils.data import DataLoader

from datamodules.caption_mix import convert_batch


def random_crop(img) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype="float32")).permute(2, 0, 1)
    dy, dx = torch.randint(0, 5, (2,)).tolist()
    return x[:, dy : dy + 8, dx : dx + 8] + torch.rand(1) + float(np.random.rand()) + random.random()


def random_text(caption: str) -> torch.Tensor:
    # a random text transform draws after the image transform of the same sample, from the same seeded state
    return torch.tensor([len(caption), torch.randint(0, 1000, ()).item(), random.randrange(1000)])


def test_the_worker_path_draws_what_the_training_process_path_draws(tiny_shards):
    """The stream without RNG restoring (what a worker runs) gives the same tensors as with it (num_workers=0)."""
    dm = make_dm(tiny_shards, p_original=0.5, num_workers=0, image_transform=random_crop, text_transform=random_text)
    loader = dm.train_dataloader()
    loader.set_epoch(1)
    restored = list(loader)
    loader.dataset.restore_rngs = False
    plain = list(loader)
    assert [b["key"] for b in restored] == [b["key"] for b in plain]
    for a, b in zip(restored, plain, strict=True):
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["text"], b["text"])


def test_training_in_process_leaves_the_callers_rngs_as_they_were(tiny_shards):
    dm = make_dm(tiny_shards, p_original=0.5, num_workers=0, image_transform=random_crop, text_transform=random_text)
    loader = dm.train_dataloader()

    def seed_all() -> None:
        torch.manual_seed(123)
        random.seed(123)
        np.random.seed(123)

    seed_all()
    next(iter(DataLoader([0], batch_size=None)))  # torch's own iterator draws its base seed from the caller's RNG
    want = [(torch.rand(1), random.random(), np.random.rand()) for _ in range(2)]
    seed_all()
    it = iter(loader)
    got = []
    for _ in range(2):
        next(it)  # a batch of seeded random transforms in this process...
        got.append((torch.rand(1), random.random(), np.random.rand()))  # ...then the caller's own streams go on
    for (t, r, n), (wt, wr, wn) in zip(got, want, strict=True):
        assert torch.equal(t, wt)
        assert r == wr
        assert n == wn


def test_convert_batch_is_default_convert_with_string_lists_passed_through():
    from torch.utils.data import default_convert

    batch = {
        "image": torch.zeros(2, 3),
        "caption": ["a", "b"],
        "arrays": [np.zeros(2), np.ones(2)],
        "mixed": ["a", 1],
        "skipped": {"counts": {"x": 1}, "examples": {"x": "u:k"}, "records": [{"key": "k", "reason": "x"}]},
    }
    ours, torchs = convert_batch(batch), default_convert(batch)
    assert ours.keys() == torchs.keys()
    assert ours["caption"] == torchs["caption"]
    assert all(isinstance(a, torch.Tensor) for a in ours["arrays"])  # numpy arrays still become tensors
    assert ours["mixed"] == torchs["mixed"]
    assert ours["skipped"] == torchs["skipped"]
