"""Formats the suite shares across its rooms: the Recap-DataComp-1B table schema.

The chat format lives in ``datamodules/chat.py`` and the prompt-set reader in ``datamodules/prompts.py``."""

import pyarrow as pa

RECAP_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("re_caption", pa.string()),
        ("org_caption", pa.string()),
        ("sha256", pa.string()),
        ("key", pa.string()),
        ("re_clip_score", pa.float64()),
        ("org_clip_score", pa.float64()),
        ("re_length", pa.int64()),
        ("org_length", pa.int64()),
        ("re_gpt4v_score", pa.int64()),
        ("org_gpt4v_score", pa.int64()),
    ]
)
"""The paper-era Recap-DataComp-1B schema (PAPER.md §7), in the released column order."""
