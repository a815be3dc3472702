"""Formats the suite shares across its rooms: the Recap-DataComp-1B table schema.

The chat format lives in ``datamodules/chat.py`` and the prompt-set reader in ``datamodules/prompts.py``."""

import pyarrow as pa

# The paper-era Recap-DataComp-1B schema (PAPER.md §7), in the released column order.
RECAP_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("url", "re_caption", "org_caption", "sha256", "key")]
    + [(c, pa.float64()) for c in ("re_clip_score", "org_clip_score")]
    + [(c, pa.int64()) for c in ("re_length", "org_length", "re_gpt4v_score", "org_gpt4v_score")]
)

# The "v2" columns the later upload added to some files only (PAPER.md §7, ANCHORS.md): a recaption conditioned on
# the original caption (top-k sampling, diverse prompts) and the length it was conditioned on. A run may mix files
# with and without them, so every reader treats them as optional: absent = null.
RECAP_V2_SCHEMA = pa.schema([("re_caption_condition_diverse_topk", pa.string()), ("re_condition_length", pa.int64())])
RECAP_V2_COLUMNS = tuple(RECAP_V2_SCHEMA.names)


def check_caption_column(column: str, where: str = "") -> None:
    """Refuse a schema column that is not text (``re_condition_length``, the scores) as a caption source."""
    for field in (*RECAP_SCHEMA, *RECAP_V2_SCHEMA):
        if field.name == column and not pa.types.is_string(field.type):
            raise ValueError(
                f"{where or 'caption source'}: column {column!r} is {field.type}, not text, so it cannot be a "
                "caption; read it as a value (datamodules.sidecar.read_sidecar) instead"
            )
