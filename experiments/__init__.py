"""recap-suite experiments: the CLI (``python -m experiments``), configs, sweeps and reports."""
