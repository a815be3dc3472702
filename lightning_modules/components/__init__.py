"""Plain ``nn.Module`` networks, losses and builders (no Lightning imports)."""
