"""A LLaVA-1.5 captioner as a transformers ``LlavaForConditionalGeneration`` (llava-hf layout: its checkpoints load in
transformers, vLLM and SGLang unchanged), from a llava-hf checkpoint or composed from a CLIP vision tower and a causal
LM with LLaVA-1.5's ``mlp2x_gelu`` projector; images are padded to a square (LLaVA-1.5's ``image_aspect_ratio: pad``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datamodules.chat import IMAGE_TOKEN, LLAMA3_LLAVA_CHAT_TEMPLATE

PAPER_RECAPTION_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}


@dataclass
class LlavaParts:
    model: Any  # LlavaForConditionalGeneration
    processor: Any  # LlavaProcessor (image processor + tokenizer + chat template)
    num_image_tokens: int
    # Parameters (names in ``model``) drawn at random when it was built, not loaded from anywhere: the projector, and
    # a vision tower / LLM given as a config dict. Only a checkpoint can bring them back (CaptionerModule keeps them).
    random_init: tuple[str, ...] = ()

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def resolve_chat_template(chat_template: str | None, tokenizer: Any) -> str:
    """``"llama3"``: our LLaMA-3 template; ``None``: the tokenizer's own; a ``.jinja`` path: its text; else the text."""
    if chat_template == "llama3":
        return LLAMA3_LLAVA_CHAT_TEMPLATE
    if chat_template is None:
        if not tokenizer.chat_template:
            raise ValueError("chat_template is None but the tokenizer has none; use chat_template: llama3")
        return tokenizer.chat_template
    if chat_template.endswith(".jinja"):
        return Path(chat_template).read_text()
    return chat_template


def _vision_tower(spec: str | dict, dtype: torch.dtype | None) -> tuple[Any, Any]:
    """-> (CLIPVisionModel, CLIPImageProcessor or None)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if isinstance(spec, dict):
        model, image_processor = CLIPVisionModel(CLIPVisionConfig(**spec)), None
    elif (Path(spec) / "open_clip_config.json").is_file():  # an export-clip folder
        from lightning_modules.components.hf_clip_vision import open_clip_export_to_hf_vision

        model, image_processor = open_clip_export_to_hf_vision(spec, with_projection=False)
    else:
        model = CLIPVisionModel.from_pretrained(spec, dtype=dtype)
        try:
            image_processor = CLIPImageProcessor.from_pretrained(spec)
        except OSError:
            image_processor = None
    return (model.to(dtype) if dtype else model), image_processor


def _llava_image_processor(base: Any, vision_config: Any, overrides: dict | None) -> Any:
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    size = vision_config.image_size
    kwargs: dict[str, Any] = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    kwargs.update(image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_pad=True)  # LLaVA-1.5: pad
    if base is not None:
        kwargs.update(size=dict(base.size), crop_size=dict(base.crop_size), resample=base.resample)
        kwargs.update(image_mean=list(base.image_mean), image_std=list(base.image_std))
        kwargs.update(do_center_crop=base.do_center_crop)
    return LlavaImageProcessor(**{**kwargs, **(overrides or {})})


def _prepare_tokenizer(tokenizer: Any, chat_template: str | None) -> Any:
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        pad = "<|finetune_right_pad_id|>"  # LLaMA-3.1's padding token; LLaMA-3 has none, so fall back to eos
        tokenizer.pad_token = pad if pad in tokenizer.get_vocab() else tokenizer.eos_token
    tokenizer.chat_template = resolve_chat_template(chat_template, tokenizer)
    return tokenizer


def num_image_tokens(vision_config: Any, strategy: str) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2 + (1 if strategy == "full" else 0)


def build_llava(
    pretrained: str | None = None,
    vision_tower: str | dict | None = None,
    llm: str | dict | None = None,
    tokenizer: str | None = None,
    chat_template: str | None = "llama3",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    image_processor: dict | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> LlavaParts:
    """The captioner; ``tokenizer`` defaults to the ``llm`` (or ``pretrained``) folder, and is required for a config
    dict ``llm``; ``image_processor`` overrides the processor's settings."""
    from transformers import (
        AutoModelForCausalLM,
        AutoProcessor,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    remote = {"trust_remote_code": trust_remote_code}  # off unless configured: only transformers' own classes run
    weights = {"dtype": torch_dtype, "attn_implementation": attn_implementation, **remote}
    if pretrained is not None:
        if vision_tower is not None or llm is not None:
            raise ValueError("give either pretrained (a llava-hf checkpoint) or vision_tower + llm, not both")
        model = LlavaForConditionalGeneration.from_pretrained(pretrained, **weights)
        processor = AutoProcessor.from_pretrained(pretrained, **remote)
        if tokenizer is not None:
            processor.tokenizer = AutoTokenizer.from_pretrained(tokenizer, **remote)
        _prepare_tokenizer(processor.tokenizer, chat_template)
        processor.chat_template = processor.tokenizer.chat_template
        cfg = model.config
        n_tokens = num_image_tokens(cfg.vision_config, cfg.vision_feature_select_strategy)
        return LlavaParts(model, processor, n_tokens)

    if vision_tower is None or llm is None:
        raise ValueError("model needs pretrained: <llava-hf checkpoint>, or both vision_tower and llm")
    vision, base_processor = _vision_tower(vision_tower, torch_dtype)
    if isinstance(llm, dict):
        if tokenizer is None:
            raise ValueError("llm is a config dict, so tokenizer must name a tokenizer folder")
        lm = LlamaForCausalLM(LlamaConfig(**llm))
        lm = lm.to(torch_dtype) if torch_dtype else lm
    else:
        lm = AutoModelForCausalLM.from_pretrained(llm, **weights)
    tok = AutoTokenizer.from_pretrained(tokenizer or llm, **remote)
    _prepare_tokenizer(tok, chat_template)
    if len(tok) > lm.get_input_embeddings().num_embeddings:  # <image> (and pad) were added
        resize_embeddings_to_mean(lm, len(tok))

    config = LlavaConfig(
        vision_config=vision.config,
        text_config=lm.config,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    # Build the shell on the meta device and move the loaded towers in: an 8B LLM is never allocated twice.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    # The projector is created in fp32 whatever ``dtype`` is: it is what stage 1 trains, and AdamW on bf16 weights
    # has no fp32 master copy (LLaVA's bf16 runs keep one in DeepSpeed). Mixed dtypes need autocast (bf16-mixed).
    model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = eos_token_ids(tok)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"parameters left uninitialised after composing the model: {leftovers[:5]}")

    random_prefixes = ("model.multi_modal_projector.",)
    random_prefixes += ("model.vision_tower.",) if isinstance(vision_tower, dict) else ()
    random_prefixes += ("model.language_model.", "lm_head.") if isinstance(llm, dict) else ()
    random_init = tuple(n for n, _ in model.named_parameters() if n.startswith(random_prefixes))

    ip = _llava_image_processor(base_processor, vision.config, image_processor)
    processor = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=tok.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's class token
    )
    return LlavaParts(model, processor, num_image_tokens(vision.config, vision_feature_select_strategy), random_init)


def resize_embeddings_to_mean(lm: Any, n_tokens: int) -> None:
    """Grow ``lm``'s token embeddings (and an untied output layer) to ``n_tokens`` rounded up to 64, new rows the mean
    of the old (LLaVA's ``smart_tokenizer_and_embedding_resize``): not a random draw, so a checkpoint without the frozen
    weights still restores the trained model."""
    old = lm.get_input_embeddings().num_embeddings
    lm.resize_token_embeddings(n_tokens, pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        layers = [lm.get_input_embeddings(), lm.get_output_embeddings()]
        for layer in {id(x.weight): x for x in layers if x is not None}.values():  # once when tied
            layer.weight[old:] = layer.weight[:old].mean(0, keepdim=True)


def eos_token_ids(tokenizer: Any) -> list[int]:
    """End-of-turn ids that stop generation (LLaMA-3: ``<|eot_id|>`` and ``<|end_of_text|>``)."""
    ids = [tokenizer.eos_token_id]
    for t in ("<|eot_id|>", "<|end_of_text|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    return [i for i in ids if i is not None]


def save_llava(parts: LlavaParts, out_dir: str | Path) -> Path:
    """``save_pretrained`` of model and processor (safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts.model.save_pretrained(out, safe_serialization=True)
    parts.processor.save_pretrained(out)
    (out / "recap_suite.json").write_text(json.dumps({"num_image_tokens": parts.num_image_tokens}, indent=2))
    return out


def caption_prompt_text(tokenizer: Any, prompt: str) -> str:
    """The chat-template text of one user turn (image + ``prompt``) plus the assistant header to generate after."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Generated:
    text: str
    n_tokens: int  # generated tokens before the end-of-turn token
    hit_limit: bool  # stopped by max_new_tokens, not by an end-of-turn token


def greedy_captions(
    model: Any,
    processor: Any,
    prompt_text: str,
    images: Any,
    max_new_tokens: int,
    device: Any,
    repetition_penalty: float | None = None,
) -> list[Generated]:
    """One batch of greedy captions (left padding, KV cache, stop at end of turn): the suite's one decoding path, for
    ``CaptionerModule.caption`` and the recaption job."""
    tok = processor.tokenizer
    inputs = processor(
        images=list(images),
        text=[prompt_text] * len(images),
        add_special_tokens=False,  # the template wrote <|begin_of_text|>
        padding=True,
        padding_side="left",
        return_tensors="pt",
    ).to(device)
    # by name: the model may be wrapped (peft's PeftModel during LoRA training)
    vision_dtype = next(p.dtype for n, p in model.named_parameters() if "vision_tower" in n)
    inputs["pixel_values"] = inputs["pixel_values"].to(vision_dtype)
    eos = eos_token_ids(tok)
    greedy = dict(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    if repetition_penalty:
        greedy["repetition_penalty"] = repetition_penalty
    with torch.inference_mode():
        out = model.generate(**inputs, **greedy)
    results = []
    for ids in out[:, inputs["input_ids"].shape[1] :].tolist():
        ended = next((i for i, t in enumerate(ids) if t in eos), None)
        n = ended if ended is not None else len([t for t in ids if t != tok.pad_token_id])
        text = tok.decode(ids[:n], skip_special_tokens=True).strip()
        results.append(Generated(text, n, ended is None and n >= max_new_tokens))
    return results
