"""Config checks that run before anything is built (``experiments/validate.py`` calls them from the CLI).

A LightningModule or DataModule states its own rules in a classmethod ``validate_config(args, run)``: ``args`` are
its resolved ``init_args`` (a plain dict, defaults filled in), ``run`` is what the trainer config says about the
processes (:class:`RunContext`). A broken rule raises :class:`ConfigError` naming the constructor argument; the CLI
turns it into one line with the full dotted key and exits with code 2 before a directory is created.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config value that cannot work. ``key`` is the constructor argument (``model``, ``init_from``), ``problem``
    what is wrong with ``value``; ``str()`` reads ``"<key> <problem>, got <value>"``."""

    def __init__(self, key: str, value: Any, problem: str):
        self.key, self.value, self.problem = key, value, problem
        super().__init__(f"{key} {problem}, got {value!r}")


@dataclass(frozen=True)
class RunContext:
    """What the trainer config fixes about the run, for rules that depend on it: ``world_size`` is ``devices x
    num_nodes`` when both are explicit (``None`` for ``devices: auto`` / ``-1``, which only the launched processes
    know); ``accumulate_grad_batches`` the trainer's gradient accumulation."""

    world_size: int | None = None
    accumulate_grad_batches: int = 1


_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors", ".json", ".yaml", ".yml", ".tar", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_remote(path: str) -> bool:
    """An fsspec URL (``s3://``, ``gs://``, ``https://``) or a webdataset ``pipe:`` command: not checked here."""
    return path.startswith("pipe:") or "://" in path


def looks_like_hub_id(name: str) -> bool:
    """``name`` could be a Hugging Face hub repo id (``gpt2``, ``openai/clip-vit-large-patch14``: at most one ``/``,
    no leading ``/``, ``.`` or ``~``, no ``..``, no file suffix such as ``.ckpt``), not a path (``runs/x/hf``,
    ``./llm``). A missing two-part relative folder (``models/llm``) therefore reads as a hub name."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.lower().endswith(_FILE_SUFFIXES)


def check_path(
    key: str, value: Any, kind: Literal["file", "dir", "any"] = "any", hub_ok: bool = False, what: str = ""
) -> None:
    """Raise :class:`ConfigError` when the local path ``value`` (if set) is not an existing ``kind``; URLs and
    ``pipe:`` commands are not checked, nor (``hub_ok``) a hub name that is no folder here. ``what`` says what the
    path should hold (it goes into the message)."""
    if not isinstance(value, str | os.PathLike):
        return
    text = os.fspath(value)
    path = Path(text).expanduser()
    if is_remote(text) or {"file": path.is_file, "dir": path.is_dir, "any": path.exists}[kind]():
        return
    if hub_ok and not path.exists() and looks_like_hub_id(text):
        return
    noun = {"file": "file", "dir": "folder", "any": "file or folder"}[kind]
    found = f" (a {'folder' if path.is_dir() else 'file'} is there)" if path.exists() else ""
    raise ConfigError(key, text, f"must name an existing {noun}{found}" + (f": {what}" if what else ""))


def check_shards(key: str, spec: str | Sequence[str] | None) -> None:
    """Raise :class:`ConfigError` when a shard spec (braces, globs, folders, ``::`` lists) expands to nothing or names
    local shards that do not exist. Every local shard is checked (one ``stat`` each)."""
    if spec is None:
        return
    from datamodules.shards import expand_urls

    try:
        urls = expand_urls(spec)
    except ValueError:
        raise ConfigError(key, spec, "matches no shards") from None
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise ConfigError(key, spec, f"names {len(missing)} missing shards of {len(urls)} (e.g. {missing[0]})")


def per_device_batch(
    batch_size: int | None, global_batch_size: int | None, world_size: int | None, accumulate_grad_batches: int = 1
) -> int | None:
    """The per-device batch from exactly one of ``batch_size`` (per device) and ``global_batch_size`` (samples per
    optimizer step over all ranks, the paper's unit: ``batch x devices x num_nodes x accumulate_grad_batches``).
    The global batch must split evenly; ``None`` while the world size is unknown."""
    if (batch_size is None) == (global_batch_size is None):
        raise ConfigError("batch_size", batch_size, "or global_batch_size must be given (exactly one of them)")
    if batch_size is not None:
        if batch_size < 1:
            raise ConfigError("batch_size", batch_size, "must be >= 1")
        return int(batch_size)
    if global_batch_size < 1:
        raise ConfigError("global_batch_size", global_batch_size, "must be >= 1")
    if world_size is None:
        return None
    split = world_size * max(1, accumulate_grad_batches)
    if global_batch_size % split:
        why = f"must be divisible by devices x num_nodes x accumulate_grad_batches = {world_size} x "
        why += f"{max(1, accumulate_grad_batches)} (each rank takes an equal share of every optimizer step)"
        raise ConfigError("global_batch_size", global_batch_size, why)
    return global_batch_size // split


def _positive_int_or_none(key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, "must be an integer (or null to turn the check off)")
    if value < 1:
        raise ConfigError(key, value, "must be >= 1 (or null to turn the check off)")


def check_sample_limits(
    min_image_size: Any, max_image_pixels: Any, max_caption_chars: Any, jpeg_draft: Any = True
) -> None:
    """Raise :class:`ConfigError` for loader limits (``datamodules.wds_stages.SampleLimits``) that cannot work: a
    size, pixel or character limit below 1, a pixel limit under ``min_image_size`` squared (every image would be
    skipped), a pixel limit PIL itself refuses (over twice ``PIL.Image.MAX_IMAGE_PIXELS``), a non-bool draft flag."""
    _positive_int_or_none("min_image_size", min_image_size)
    _positive_int_or_none("max_image_pixels", max_image_pixels)
    _positive_int_or_none("max_caption_chars", max_caption_chars)
    from PIL import Image

    ceiling = None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS
    if max_image_pixels is not None and min_image_size is not None and max_image_pixels < min_image_size**2:
        why = f"must be >= min_image_size^2 = {min_image_size**2} (every image would be skipped)"
        raise ConfigError("max_image_pixels", max_image_pixels, why)
    if max_image_pixels is not None and ceiling is not None and max_image_pixels > ceiling:
        why = f"must be <= {ceiling} (PIL refuses larger images itself: twice PIL.Image.MAX_IMAGE_PIXELS)"
        raise ConfigError("max_image_pixels", max_image_pixels, why)
    if not isinstance(jpeg_draft, bool):
        raise ConfigError("jpeg_draft", jpeg_draft, "must be true or false")
