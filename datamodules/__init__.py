"""Data for recap-suite: the caption-mix DataModule, its webdataset stages, caption sidecars and the tiny world."""

from datamodules.caption_mix import CaptionMixDataModule, DataTransforms

__all__ = ["CaptionMixDataModule", "DataTransforms"]
