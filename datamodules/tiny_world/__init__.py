"""The tiny world: a seeded synthetic web of 64x64 shape scenes with noisy alt-text and full ground truth, written in
the layouts real data uses, so the whole suite trains and is tested on CPU with no network (see README.md here)."""

from .writer import WorldConfig, generate_world

__all__ = ["WorldConfig", "generate_world"]
