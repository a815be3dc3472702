"""LightningModules of recap-suite. They wire plain networks from ``components`` to data, losses and logging."""

from lightning_modules.clip import ClipModule

__all__ = ["ClipModule"]
