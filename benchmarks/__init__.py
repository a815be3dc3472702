"""Benchmarks of the suite (run as modules, e.g. ``python -m benchmarks.loader``); see ``benchmarks/README.md``."""
