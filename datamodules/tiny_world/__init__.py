"""The tiny world: a seeded synthetic web of 64x64 shape scenes with noisy alt-text and full ground truth.

It is written in the layouts real data uses (img2dataset webdataset shards, LLaVA json, Karpathy json, Urban1K,
Recap-COCO-30K parquet, an ImageFolder), so the whole suite trains and is tested on CPU with no network. See
README.md in this folder for the contents, every knob and the layout. The scenes are in ``scene.py``, the texts in
``text.py``, the truth recaptioner in ``recaption.py`` and the writer (and readers of what it writes) in ``writer.py``.
"""

from .writer import WorldConfig, generate_world

__all__ = ["WorldConfig", "generate_world"]
