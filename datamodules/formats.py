"""Formats the suite shares across its rooms: the Recap-DataComp-1B table schema.

The chat format lives in ``datamodules/chat.py`` and the prompt-set reader in ``datamodules/prompts.py``."""

import pyarrow as pa

# The paper-era Recap-DataComp-1B schema (PAPER.md §7), in the released column order.
RECAP_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("url", "re_caption", "org_caption", "sha256", "key")]
    + [(c, pa.float64()) for c in ("re_clip_score", "org_clip_score")]
    + [(c, pa.int64()) for c in ("re_length", "org_length", "re_gpt4v_score", "org_gpt4v_score")]
)
