"""Batch jobs: recaptioning, sidecar joins, the DiT cache."""
