"""``LlavaJsonDataModule``: LLaVA-Pretrain (LCS-558K) and LLaVA-665K json files (multi-turn, ``<image>`` once in a
human turn, text-only samples without an ``image`` key) with their image folders, encoded by the LightningModule's
``data_transforms`` (the chat template with assistant-only labels, the image processor) and padded per batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from datamodules.chat import IMAGE_TOKEN, llava_to_messages, pad_sequences
from datamodules.checks import RunContext, check_path, per_device_batch


def load_llava_json(path: str) -> list[dict[str, Any]]:
    """Read and check a LLaVA json (a list of records). Errors name the file and the record id."""
    import fsspec

    with fsspec.open(path, "r") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid json ({e})") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a json list of samples, got {type(records).__name__}")
    bad = []
    for i, r in enumerate(records):
        rid = r.get("id", i) if isinstance(r, dict) else i
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list) or not r["conversations"]:
            bad.append(f"record {i} (id {rid}): needs a non-empty 'conversations' list")
            continue
        n_placeholders = sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in r["conversations"])
        expected = 1 if r.get("image") else 0
        if n_placeholders != expected:
            bad.append(f"record {i} (id {rid}): {n_placeholders} '<image>' placeholders for {expected} image(s)")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"{path}: {len(bad)} malformed records: " + "; ".join(bad[:5]) + more)
    return records


def approx_length(record: dict[str, Any], image_tokens: int) -> int:
    """A cheap length for grouping (LLaVA's ``lengths``: words + image tokens); exact token counts are not needed."""
    words = sum(len(str(t.get("value", "")).split()) for t in record["conversations"])
    return words + (image_tokens if record.get("image") else 0)


class LlavaJsonDataset(Dataset):
    """One LLaVA json + image folder; an item is the conversation's encoding plus ``image`` (if any) and ``id``."""

    def __init__(
        self,
        json_path: str,
        image_folder: str | None,
        conversation: Callable,
        image_transform: Callable | None,
        max_samples: int | None = None,
    ):
        self.json_path, self.image_folder = json_path, image_folder
        self.records = load_llava_json(json_path)[:max_samples]
        if any(r.get("image") for r in self.records) and image_folder is None:
            raise ValueError(f"{json_path} has image samples but image_folder is not set")
        self.conversation, self.image_transform = conversation, image_transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        where = f"{self.json_path} id {r.get('id', i)}"
        item = self.conversation(llava_to_messages(r["conversations"], where), where=where)
        item["id"] = str(r.get("id", i))
        if r.get("image"):
            path = os.path.join(self.image_folder, r["image"])
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError) as e:
                raise ValueError(f"{where}: cannot read image {path}: {e}") from e
            item["image"] = self.image_transform(image) if self.image_transform is not None else image
        return item


class LlavaCollate:
    """Pad ids/labels, stack the images of the samples that have one (in order: LLaVA scatters image features into the
    ``<image>`` positions of the batch in that order), and count truncated samples."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = pad_sequences(items, self.pad_id)
        images = [x["image"] for x in items if "image" in x]
        batch["pixel_values"] = torch.stack(images) if images else None
        batch["n_truncated"] = sum(bool(x["truncated"]) for x in items)
        batch["id"] = [x["id"] for x in items]
        return batch


class LlavaJsonDataModule(L.LightningDataModule):
    """LLaVA json files as train (and optional validation) loaders.

    Args:
        train_json: LLaVA json of training conversations (path or fsspec URL); ``image_folder``: where its records'
            ``image`` paths are. ``val_json`` / ``val_image_folder`` likewise, for a teacher-forced validation loss.
        group_by_length: Batch samples of similar length together (LLaVA ``--group_by_length``, transformers'
            ``LengthGroupedSampler``) so that little compute goes to padding.
        max_samples: Use only the first N records of each json (debugging).
    """

    def __init__(
        self,
        train_json: str,
        image_folder: str | None,
        batch_size: int,
        val_json: str | None = None,
        val_image_folder: str | None = None,
        num_workers: int = 2,
        group_by_length: bool = True,
        max_samples: int | None = None,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        per_device_batch(batch_size, None, None)
        self.batch_size = batch_size
        self.train_dataset: LlavaJsonDataset | None = None
        self.val_dataset: LlavaJsonDataset | None = None

    @classmethod
    def validate_config(cls, args: dict[str, Any], run: RunContext) -> None:
        """Before anything is built (``experiments/validate.py``): the batch, and the local files and folders exist."""
        per_device_batch(args.get("batch_size"), None, run.world_size)
        check_path("train_json", args.get("train_json"), "file", what="LLaVA json of training conversations")
        check_path("image_folder", args.get("image_folder"), "dir")
        check_path("val_json", args.get("val_json"), "file")
        check_path("val_image_folder", args.get("val_image_folder"), "dir")

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = self._dataset("fit", hp.train_json, hp.image_folder)
        if stage in ("fit", "validate") and hp.val_json and self.val_dataset is None:
            self.val_dataset = self._dataset("validate", hp.val_json, hp.val_image_folder or hp.image_folder)

    def _dataset(self, stage: str, json_path: str, image_folder: str | None) -> LlavaJsonDataset:
        module = self.trainer.lightning_module if self.trainer is not None else None
        provider = getattr(module, "data_transforms", None)
        t = provider(stage) if callable(provider) else None
        if t is None or getattr(t, "conversation", None) is None:
            raise ValueError("LlavaJsonDataModule needs a LightningModule whose data_transforms() has a conversation")
        return LlavaJsonDataset(json_path, image_folder, t.conversation, t.image, self.hparams.max_samples)

    def _loader(self, ds: LlavaJsonDataset, sampler: Any, train: bool = False) -> DataLoader:
        workers, collate = self.hparams.num_workers, LlavaCollate(ds.conversation.pad_id)
        kw = {"drop_last": train, "persistent_workers": train and workers > 0, "pin_memory": self.hparams.pin_memory}
        return DataLoader(ds, self.batch_size, sampler=sampler, num_workers=workers, collate_fn=collate, **kw)

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset
        generator = torch.Generator().manual_seed(self.hparams.seed)
        if self.hparams.group_by_length:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            n_tokens = ds.conversation.num_image_tokens
            lengths = [approx_length(r, n_tokens) for r in ds.records]
            world = self.trainer.world_size if self.trainer is not None else 1
            # transformers groups by the global batch (batch x ranks); Lightning then splits the order across ranks
            sampler = LengthGroupedSampler(self.batch_size * world, lengths=lengths, generator=generator)
        else:
            sampler = RandomSampler(ds, generator=generator)
        return self._loader(ds, sampler, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_dataset is None else self._loader(self.val_dataset, SequentialSampler(self.val_dataset))
