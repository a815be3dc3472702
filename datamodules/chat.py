"""The LLaMA-3 chat template with LLaVA's ``<image>`` placeholder, and conversation -> (input_ids, labels).

Training masks come from the tokenizer itself: ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks
the characters rendered inside ``{% generation %}`` blocks and maps them to tokens through the fast tokenizer's
offsets. The loss therefore covers exactly the assistant replies and their ``<|eot_id|>``: there is no second
tokenisation of the turns and no length bookkeeping that can drift (the source of LLaVA's "tokenization mismatch",
where whole samples were silently zero-masked).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"

# Meta-Llama-3-8B-Instruct's template (bos, then per message "<|start_header_id|>ROLE<|end_header_id|>\n\n" + trimmed
# content + "<|eot_id|>", and the assistant header as generation prompt), extended with (1) content given as a list
# of {"type": "image"} / {"type": "text"} items, as transformers' processors pass it (an image item renders as
# "<image>\n", LLaVA-1.5's layout), and (2) {% generation %} around assistant replies and their <|eot_id|>, which is
# what return_assistant_tokens_mask reads. With plain-string content and no images it renders byte for byte like the
# original template.
LLAMA3_LLAVA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set text = ns.text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- text | trim + '<|eot_id|>' -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- text | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

LLAMA3_SPECIAL_TOKENS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "pad_token": "<|finetune_right_pad_id|>",
}
LLAMA3_ADDITIONAL_TOKENS = ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def llava_to_messages(conversations: Sequence[Mapping[str, Any]], where: str = "") -> list[dict[str, str]]:
    """LLaVA json turns (``{"from": "human"|"gpt", "value"}``) -> chat messages (``{"role", "content"}``); the
    ``<image>`` placeholder stays where the data put it (LLaVA-665K has ``"<image>\\nQ"`` and ``"Q\\n<image>"``)."""
    messages = []
    for i, turn in enumerate(conversations):
        role = ROLES.get(turn.get("from", turn.get("role")))
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise ValueError(f"{where}: turn {i} needs 'from' in {sorted(ROLES)} and a string 'value', got {turn!r}")
        messages.append({"role": role, "content": value})
    return messages


class ConversationEncoder:
    """Chat messages -> ``{"input_ids", "labels", "n_images", "truncated"}`` (picklable; runs in loader workers).

    ``<image>`` (one special token) becomes ``num_image_tokens`` copies, as ``LlavaProcessor`` expands it (tested), so
    the ids line up with the patch features ``LlavaModel`` scatters there. Labels are the ids under the assistant mask,
    else -100. Sequences over ``max_length`` are cut and flagged ``truncated``; a cut into the image tokens is an error.
    """

    def __init__(self, tokenizer: Any, num_image_tokens: int, max_length: int, image_token: str = IMAGE_TOKEN):
        if "{% generation %}" not in (tokenizer.chat_template or "").replace("{%- generation %}", "{% generation %}"):
            raise ValueError(
                "the tokenizer's chat_template has no {% generation %} block, so assistant tokens cannot be masked; "
                "use chat_template: llama3 (LLAMA3_LLAVA_CHAT_TEMPLATE) or add the markers to yours"
            )
        self.tokenizer, self.num_image_tokens, self.max_length = tokenizer, num_image_tokens, max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; add it as a special token")

    def __call__(self, messages: Sequence[Mapping[str, Any]], where: str = "") -> dict[str, Any]:
        out = self.tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = torch.tensor(list(out["input_ids"]), dtype=torch.long)
        mask = torch.tensor(list(out["assistant_masks"]), dtype=torch.bool)
        if not mask.any():
            raise ValueError(f"{where}: conversation has no assistant reply to learn from")
        is_image = ids == self.image_token_id
        labels = torch.where(mask & ~is_image, ids, IGNORE_INDEX)
        repeats = torch.where(is_image, self.num_image_tokens, 1)
        ids, labels = ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)
        truncated = len(ids) > self.max_length
        if truncated and (ids[self.max_length :] == self.image_token_id).any():
            raise ValueError(f"{where}: max_length {self.max_length} cuts into the image tokens; raise max_length")
        n = self.max_length
        return {"input_ids": ids[:n], "labels": labels[:n], "n_images": int(is_image.sum()), "truncated": truncated}


def pad_sequences(items: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded conversations into ``input_ids``/``labels``/``attention_mask`` (B, T)."""
    ids = [torch.as_tensor(x["input_ids"], dtype=torch.long) for x in items]
    labels = [torch.as_tensor(x["labels"], dtype=torch.long) for x in items]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True),
    }


class CaptionConversation:
    """Caption -> a one-turn conversation (user: ``<image>`` + a prompt, assistant: the caption), encoded: how
    image-caption shards train the captioner, as LLaVA-Pretrain's "brief caption" samples do. The prompt is drawn from
    ``prompts`` by a stable hash of the caption (reproducible across workers and runs)."""

    def __init__(self, encoder: ConversationEncoder, prompts: Sequence[str]):
        if not prompts:
            raise ValueError("caption_prompts must hold at least one prompt")
        self.encoder, self.prompts = encoder, list(prompts)

    def __call__(self, caption: str) -> dict[str, Any]:
        prompt = self.prompts[zlib.crc32(caption.encode()) % len(self.prompts)]
        messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{prompt}"}, {"role": "assistant", "content": caption}]
        return self.encoder(messages, where=f"caption {caption[:40]!r}")
