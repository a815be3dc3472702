"""``CaptionerModule``: LLaVA-1.5 (CLIP vision tower + MLP projector + LLaMA-3) training stages, on transformers'
``LlavaForConditionalGeneration`` with peft's LoRA. Data: LLaVA json conversations or image-caption shards of the
caption-mix DataModule at any p, each caption a one-turn conversation (docs/captioner.md)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.caption_mix import DataTransforms
from datamodules.chat import CaptionConversation, ConversationEncoder, pad_sequences
from datamodules.checks import RunContext, check_path
from lightning_modules.common import InLoopEvaluation, evaluating, hparams_for, unwrapped_name
from lightning_modules.components.llava import (
    PAPER_RECAPTION_PROMPT,
    LlavaParts,
    build_llava,
    caption_prompt_text,
    greedy_captions,
    save_llava,
)
from lightning_modules.components.schedules import cosine_with_warmup, per_step

PROJECTOR = "multi_modal_projector"
VISION = "vision_tower"
# LLaVA's find_all_linear_names: every linear layer of the language model, not the projector, tower or lm_head.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def pixel_values(image: Any, image_processor: Any) -> torch.Tensor:
    """PIL image -> pixel tensor (3, H, W)."""
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def set_trainable(model: torch.nn.Module, train_llm: bool, train_vision: bool, lora: bool) -> dict[str, int]:
    """Freeze/unfreeze by part; with LoRA, peft has already frozen the LLM and marked its adapters trainable."""
    counts = {"projector": 0, "llm": 0, "vision": 0}
    for name, p in model.named_parameters():
        part = "projector" if PROJECTOR in name else "vision" if VISION in name else "llm"
        if part != "llm" or not lora:
            p.requires_grad_({"projector": True, "vision": train_vision, "llm": train_llm}[part])
        counts[part] += p.numel() if p.requires_grad else 0
    return counts


class CaptionerModule(InLoopEvaluation, L.LightningModule):
    """LLaVA-1.5 captioner training. The model arguments are flat (as LLaVA's ``--vision_tower`` /
    ``--model_name_or_path``), so stacked YAMLs override one of them without restating the others.

    Args:
        lr: Peak learning rate (LLaVA-1.5: 1e-3 stage 1, 2e-5 full / 2e-4 LoRA stage 2); ``projector_lr``: LLaVA's
            ``mm_projector_lr``. Linear warm-up over ``warmup_ratio`` of the steps, then cosine.
        train_llm: Train the LLM (stage 2); stage 1 trains the projector only (and the tower with ``train_vision``).
        lora: peft ``LoraConfig`` arguments (e.g. ``{r: 128, lora_alpha: 256}``); ``target_modules`` defaults to every
            linear layer of the LLM.
        max_length: Longest training sequence in tokens (image tokens included); longer ones are cut and counted.
        save_frozen: Keep frozen weights in checkpoints. Off: only what trains (as LLaVA's stage-1
            ``mm_projector.bin``) plus frozen weights drawn at random (a config-dict tower), which nothing restores.
        caption_prompts: User prompts paired with captions when training on image-caption shards.
        evaluation: Caption evaluation tasks, run on rank 0 at every ``eval_every_n_validations``-th validation and at
            the end; metrics JSON go to ``metrics_dir``.
        pretrained: A whole llava-hf checkpoint (name or folder); excludes ``vision_tower``/``llm``.
        vision_tower: Hub name, ``save_pretrained`` or ``export-clip`` folder, or a ``CLIPVisionConfig`` dict (random
            init). ``llm``: likewise a causal LM or a ``LlamaConfig`` dict.
        chat_template: ``llama3``, ``null`` (the tokenizer's own), a ``.jinja`` path or template text.
        dtype: Weights dtype of the loaded towers (trainable weights stay fp32 under ``bf16-mixed``).
        trust_remote_code: Allow model code from the checkpoint (off: only transformers' own classes run).
    """

    def __init__(
        self,
        lr: float,
        train_llm: bool = False,
        train_vision: bool = False,
        lora: dict[str, Any] | None = None,
        projector_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        max_length: int = 2048,
        grad_checkpointing: bool = False,
        init_from: str | None = None,
        save_frozen: bool = False,
        caption_prompts: list[str] | None = None,
        caption_prompt: str = PAPER_RECAPTION_PROMPT,
        max_new_tokens: int = 128,
        evaluation: list[Any] | None = None,
        eval_every_n_validations: int = 1,
        eval_batch_size: int = 64,
        metrics_dir: str | None = None,
        pretrained: str | None = None,
        vision_tower: str | dict[str, Any] | None = None,
        llm: str | dict[str, Any] | None = None,
        tokenizer: str | None = None,
        chat_template: str | None = "llama3",
        vision_feature_layer: int = -2,
        vision_feature_select_strategy: str = "default",
        image_processor: dict[str, Any] | None = None,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["evaluation"])
        if lora is not None and not train_llm:
            raise ValueError("lora trains the LLM through adapters; set train_llm: true (stage 2) or drop lora")
        self.evaluation = list(evaluation or [])
        self.parts: LlavaParts | None = None
        self._encoder: ConversationEncoder | None = None
        self.model: torch.nn.Module | None = None
        self.strict_loading = save_frozen
        # Drawn at random when built (config-dict towers, the projector), not from init_from: checkpoints keep them.
        self._unsourced: list[str] = []
        self._restored_keys: set[str] | None = None  # state-dict keys of the checkpoint this module was restored from
        self.n_truncated = 0
        self._t_last: float | None = None

    @classmethod
    def validate_config(cls, args: dict[str, Any], run: RunContext) -> None:
        """Before anything is built (``experiments/validate.py``): the local paths named exist."""
        check_path("init_from", args.get("init_from"), "file", what="the previous stage's checkpoint (run it first)")
        for key in ("pretrained", "vision_tower", "llm", "tokenizer"):
            check_path(key, args.get(key), hub_ok=True)
        chat_template = args.get("chat_template")
        if isinstance(chat_template, str) and chat_template.endswith(".jinja"):
            check_path("chat_template", chat_template, "file")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        parts = build_llava(**hparams_for(build_llava, hp))
        model = parts.model
        random_init = set(parts.random_init)
        if hp.init_from:
            random_init -= self._load_init(model, hp.init_from)
        unsourced = {id(p) for n, p in model.named_parameters() if n in random_init}
        if hp.lora is not None:
            from peft import LoraConfig, get_peft_model

            cfg = {"target_modules": LORA_TARGETS, "task_type": None, **hp.lora}
            model = get_peft_model(model, LoraConfig(**cfg))
        counts = set_trainable(model, hp.train_llm, hp.train_vision, hp.lora is not None)
        model.train()  # from_pretrained hands back eval-mode modules (dropout off, e.g. LoRA's)
        if hp.grad_checkpointing:
            base = model.get_base_model() if hp.lora is not None else model
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        rank_zero_info(f"CaptionerModule: trainable parameters {counts}, {parts.num_image_tokens} image tokens")
        self.parts, self.model = parts, model
        self._unsourced = [n for n, p in model.named_parameters() if id(p) in unsourced]  # names under peft, too

    @staticmethod
    def _load_init(model: torch.nn.Module, path: str) -> set[str]:
        from lightning_modules.components.clip_model import load_checkpoint_file  # weights_only=True or safetensors

        ckpt = load_checkpoint_file(path)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"init_from {path}: no state_dict in the checkpoint")
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if any(".base_model.model." in k or k.startswith("base_model.model.") for k in state):
            raise ValueError(f"init_from {path} holds LoRA adapters; export it (merged) and use model.pretrained")
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"init_from {path}: keys not in this model: {result.unexpected_keys[:5]}")
        rank_zero_info(f"CaptionerModule: loaded {len(state)} tensors from {path}")
        return set(state)

    @property
    def llava(self) -> LlavaParts:
        self.configure_model()  # a no-op once built
        return self.parts

    @property
    def tokenizer(self) -> Any:
        return self.llava.tokenizer

    def encoder(self) -> ConversationEncoder:
        if self._encoder is None:  # the tokenizer and max_length are fixed once the model is built
            self._encoder = ConversationEncoder(self.tokenizer, self.llava.num_image_tokens, self.hparams.max_length)
        return self._encoder

    def data_transforms(self, stage: str) -> DataTransforms:
        encoder = self.encoder()
        prompts = self.hparams.caption_prompts or [self.hparams.caption_prompt]
        return DataTransforms(
            image=partial(pixel_values, image_processor=self.llava.processor.image_processor),  # picklable
            text=CaptionConversation(encoder, prompts),
            conversation=encoder,
        )

    def _inputs(self, batch: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        """The model's inputs and the number of truncated samples in the batch."""
        if "input_ids" in batch:  # LLaVA json batches are collated already
            inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
            pixels = batch.get("pixel_values")
            n_trunc = int(batch.get("n_truncated", 0))
        else:  # caption-mix batches: image tensor + a list of encoded one-turn conversations
            items = batch["text"]
            inputs = pad_sequences(items, self.encoder().pad_id)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            pixels = batch["image"]
            n_trunc = sum(bool(x["truncated"]) for x in items)
        if pixels is not None:
            inputs["pixel_values"] = pixels.to(next(self.llava.model.model.vision_tower.parameters()).dtype)
        return inputs, n_trunc

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        inputs, n_truncated = self._inputs(batch)
        loss = self.model(**inputs).loss
        self.n_truncated += n_truncated
        bs = inputs["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        t = self._trainer
        if t is not None and (t.global_step + 1) % max(1, t.log_every_n_steps) == 0:  # token counts sync the device
            now = time.perf_counter()
            n_tokens = int(inputs["attention_mask"].sum())
            if self._t_last is not None:  # this step's wall time (from the previous step's end), all ranks
                self.log("train/tokens_per_s", n_tokens * t.world_size / (now - self._t_last), batch_size=bs)
            self.log("train/supervised_tokens", float((inputs["labels"] != -100).sum()), batch_size=bs)
            self.log("train/truncated_samples", float(self.n_truncated), batch_size=bs)
        self._t_last = time.perf_counter()
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        inputs, _ = self._inputs(batch)
        loss = self.model(**inputs).loss
        self.log("val/loss", loss, sync_dist=True, batch_size=inputs["input_ids"].shape[0])

    def evaluate(self, tasks: Sequence[Any]) -> dict[str, float]:
        bs = self.hparams.eval_batch_size
        return {f"eval/{task.name}/{k}": v for task in tasks for k, v in task.run(self.caption, batch_size=bs).items()}

    @torch.no_grad()
    def caption(
        self,
        images: Sequence[Any],
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        batch_size: int | None = None,
    ) -> list[str]:
        """Greedy captions of PIL images (the paper's decoding: greedy, ``max_new_tokens`` 128)."""
        parts, model = self.llava, self.model
        text = caption_prompt_text(parts.tokenizer, prompt or self.hparams.caption_prompt)
        max_new_tokens = max_new_tokens or self.hparams.max_new_tokens
        bs = batch_size or len(images) or 1
        dtypes = {p.dtype for p in model.parameters()}
        lowest = min(dtypes, key=lambda d: torch.finfo(d).bits)
        autocast = torch.autocast(self.device.type, dtype=lowest) if len(dtypes) > 1 else nullcontext()
        with evaluating(model), autocast:
            batches = [
                greedy_captions(model, parts.processor, text, images[i : i + bs], max_new_tokens, self.device)
                for i in range(0, len(images), bs)
            ]
        return [g.text for generated in batches for g in generated]

    def merged_model(self, in_place: bool = False) -> torch.nn.Module:
        """The plain ``LlavaForConditionalGeneration``, LoRA adapters merged into the LLM weights."""
        if self.hparams.lora is None:
            return self.model
        model = self.model if in_place else copy.deepcopy(self.model)
        return model.merge_and_unload()

    def export_pretrained(self, out_dir: str | Path, in_place: bool = False, source: str | None = None) -> Path:
        """A llava-hf folder of the (merged) model and its processor; refused when weights it cannot rebuild are
        missing from its checkpoint (``source``): it would write fresh random weights, not the trained model."""
        self.llava  # noqa: B018 - builds the model if needed
        missing = self.missing_weights()
        if missing:
            raise ValueError(self.missing_weights_message(missing, source))
        parts = LlavaParts(self.merged_model(in_place), self.llava.processor, self.llava.num_image_tokens)
        return save_llava(parts, out_dir)

    def missing_weights(self) -> list[str]:
        """``model.*`` keys drawn at random when this module was built that its checkpoint did not restore."""
        if self._restored_keys is None or self.hparams.save_frozen:
            return []
        unsourced = [f"model.{unwrapped_name(n)}" for n in self._unsourced]
        return [k for k in unsourced if k not in self._restored_keys]

    def missing_weights_message(self, missing: list[str], source: str | None = None) -> str:
        names = {"vision_tower": "vision tower", "language_model": "LLM", "lm_head": "LLM", PROJECTOR: "projector"}
        parts = sorted({next((v for k, v in names.items() if f".{k}." in key), "other") for key in missing})
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return (
            f"{source or 'the checkpoint'} lacks {len(missing)} weights that were drawn at random when the model was "
            f"built ({', '.join(parts)}: a config dict, not a saved model) and are neither trainable nor loaded from "
            f"anywhere: {shown}. They cannot be rebuilt; refusing to export new random ones. Fix: retrain with "
            "save_frozen: true, or with vision_tower / llm given as saved folders (save_pretrained); checkpoints "
            "written now keep such weights themselves"
        )

    @classmethod
    def from_checkpoint_contents(cls, contents: Any, path: str | Path) -> CaptionerModule:
        """The module of a Lightning checkpoint read (safely) from ``path``, as ``load_from_checkpoint`` does."""
        hp = contents.get("hyper_parameters") if isinstance(contents, Mapping) else None
        state = contents.get("state_dict") if isinstance(contents, Mapping) else None
        if not isinstance(hp, Mapping) or not isinstance(state, Mapping):
            raise ValueError(f"{path} is not a Lightning checkpoint (no hyper_parameters / state_dict)")
        class_path = hp.get("_class_path")  # LightningCLI records the module's class
        if class_path is not None and class_path != f"{cls.__module__}.{cls.__qualname__}":
            raise ValueError(f"{path} is a checkpoint of {class_path}, not of {cls.__qualname__}")
        try:
            module = cls(**hparams_for(cls, hp))
        except TypeError as e:
            raise ValueError(f"{path} is not a {cls.__qualname__} checkpoint: {e}") from None
        module.configure_model()
        module.on_load_checkpoint(contents)
        module.load_state_dict(state, strict=module.strict_loading)
        return module

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Without ``save_frozen``: only what trains and the frozen weights drawn at random (see ``save_frozen``)."""
        if self.hparams.save_frozen:
            return
        unsourced = {unwrapped_name(n) for n in self._unsourced}
        named = ((unwrapped_name(n), p) for n, p in self.model.named_parameters())
        keep = {f"model.{n}" for n, p in named if p.requires_grad or n in unsourced}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if unwrapped_name(k) in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        self._restored_keys = {unwrapped_name(k) for k in state} if isinstance(state, Mapping) else set()
        missing = self.missing_weights()
        if missing:  # resume / validate go on (with new random weights there); export refuses
            rank_zero_warn(self.missing_weights_message(missing))

    def configure_optimizers(self):
        hp = self.hparams
        total = int(self.trainer.estimated_stepping_batches)
        warmup = math.ceil(hp.warmup_ratio * total)
        projector_lr = hp.projector_lr if hp.projector_lr is not None else hp.lr
        groups: dict[tuple[bool, bool], list] = {}  # (projector?, no decay?) -> parameters; sorted: the saved order
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                no_decay = p.ndim < 2 or "bias" in name or "norm" in name
                groups.setdefault((PROJECTOR in name, no_decay), []).append(p)
        param_groups = [
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else hp.weight_decay,
                "lr": projector_lr if projector else hp.lr,
            }
            for (projector, no_decay), params in sorted(groups.items())
        ]
        rank_zero_info(f"CaptionerModule: lr {hp.lr:g} (projector {projector_lr:g}), warm-up {warmup} of {total} steps")
        opt = torch.optim.AdamW(param_groups, betas=tuple(hp.betas))
        return per_step(opt, lambda step: cosine_with_warmup(step, warmup, total))
