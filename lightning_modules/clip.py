"""``ClipModule``: contrastive image-text training (Recap-CLIP) with open_clip's network, loss and tokenizer, the
CLIPA schedule in samples and its two stages (``init_from``), and the evaluation harness in the loop and as ``test``
(docs/clip.md)."""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from datamodules.caption_mix import DataTransforms
from datamodules.checks import ConfigError, RunContext, check_path
from lightning_modules.common import InLoopEvaluation, evaluating, hparams_for, unwrapped_name
from lightning_modules.components.clip_model import (
    LOGIT_PARAMS,
    TokenizeOne,
    build_clip,
    load_clip_weights,
    logit_layout_conflict,
    reshape_logit_params,
    resolve_model_config,
)
from lightning_modules.components.losses import (
    LOSSES,
    CaptionDecoder,
    caption_loss,
    make_clip_loss,
    make_contrastive_loss,
    multi_caption_loss,
    pad_token_id,
)
from lightning_modules.components.schedules import cosine_with_warmup, per_step

__all__ = ["ClipModule", "cosine_with_warmup", "make_clip_loss"]
_DECODER_KEYS = {"weight", "target", "prefix", "layers", "width", "heads", "vocab"}


class ClipModule(InLoopEvaluation, L.LightningModule):
    """Contrastive training of an open_clip model.

    Args:
        model: open_clip name, ``recap-clip:VISION:TEXT[:STYLE]`` (Table 2), ``local-dir:PATH``, a JSON config path or
            the config dict.
        lr_per_256: The paper's base lr per 256 samples, scaled by the global batch (or an absolute ``lr``);
            ``warmup_samples`` / ``total_samples`` (where the cosine reaches 0) are in samples too.
        image_size, context_length, tokenizer: Overrides of the model config (CLIPA: 112 px in stage 1, 224 in 2).
        init_from: Checkpoint to start from (stage 2: stage 1's); position embeddings are interpolated.
        nonscalar_logit_scale: open_clip's logit scale of shape [1] (FSDP needs it); checkpoints load across layouts.
        evaluation: Evaluation tasks, run on rank 0 at every ``eval_every_n_validations``-th validation and on the
            final weights; metrics JSON go to ``metrics_dir``.
        loss: ``clip`` (open_clip's ClipLoss) or ``siglip`` (its SigLipLoss; needs ``init_logit_bias``).
        init_logit_scale, init_logit_bias: The initial log temperature and logit bias (SigLIP: log(10) and -10).
        text_views: ``{view: weight}``: the loss is the weighted sum over ``batch["texts"][view]`` (``text``: p-drawn).
        caption_decoder: ``{weight, target, prefix, layers, width, heads, vocab}``: an added caption decoder loss
            (Table 8's objectives: docs/clip.md).
    """

    log_prefix = "eval/"
    metrics_extra = ("model", "init_from")

    def __init__(
        self,
        model: str | dict[str, Any],
        lr: float | None = None,
        lr_per_256: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        warmup_samples: int | None = None,
        total_samples: int | None = None,
        context_length: int | None = None,
        image_size: int | None = None,
        tokenizer: str | None = None,
        augmentation: dict[str, Any] | None = None,
        train_augment: bool = True,
        init_from: str | None = None,
        nonscalar_logit_scale: bool = False,
        grad_checkpointing: bool = False,
        compile: bool = False,
        evaluation: Sequence[Any] | None = None,
        eval_every_n_validations: int = 1,
        eval_batch_size: int = 256,
        metrics_dir: str | None = None,
        loss: str = "clip",
        init_logit_scale: float | None = None,
        init_logit_bias: float | None = None,
        text_views: dict[str, float] | None = None,
        caption_decoder: dict[str, Any] | None = None,
    ):
        super().__init__()
        if (lr is None) == (lr_per_256 is None):
            raise ValueError("give exactly one of lr (absolute peak) and lr_per_256 (the paper's per-256 base lr)")
        if warmup_steps and warmup_samples:
            raise ValueError("give warm-up as warmup_steps or warmup_samples, not both")
        # Evaluation tasks are objects: out of the checkpoint's hparams, so that it loads with weights_only=True.
        self.save_hyperparameters(ignore=["evaluation"])
        self.loss_fn = make_contrastive_loss(loss)
        if text_views is not None and not text_views:
            raise ValueError("text_views is empty: give {view: weight, ...} or leave it null for batch['text']")
        self.text_views = dict(text_views or {"text": 1.0})
        parts = build_clip(**hparams_for(build_clip, self.hparams, strict=True))
        self.model, self._parts = parts.model, parts
        self.tokenizer, self.context_length = parts.tokenizer, parts.context_length
        if loss == "siglip" and self.model.logit_bias is None:
            raise ValueError("loss: siglip needs a logit bias: set init_logit_bias (SigLIP: -10)")
        if loss != "siglip" and init_logit_bias is not None:  # DDP stops on a parameter that gets no gradient
            raise ValueError(f"init_logit_bias is for loss: siglip; loss: {loss} has no logit bias")
        self.decoder = self._build_decoder(caption_decoder) if caption_decoder else None
        # open_clip's rule (no weight decay on gains, biases, norms, the temperature), decided on the unwrapped model:
        # under FSDP a rank sees flat 1-D shards, and a parameter it does not own has shape [0].
        self._nonscalar = self.model.logit_scale.ndim == 1
        self._no_decay = {
            name
            for name, p in self._named_trained()
            if p.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name
        }
        if init_from:
            load_clip_weights(self.model, init_from)
            rank_zero_info(f"ClipModule: initialised from {init_from}")
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        # Not registered as a submodule: checkpoints keep the plain ``model.*`` keys with or without compile.
        object.__setattr__(self, "_forward", torch.compile(self.model) if compile else self.model)
        self.evaluation = list(evaluation or [])
        self._t0: float | None = None
        self._test_features: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _build_decoder(self, cfg: dict[str, Any]) -> CaptionDecoder:
        unknown = sorted(set(cfg) - _DECODER_KEYS)
        missing = sorted({"target", "layers", "width", "heads"} - set(cfg))
        if unknown or missing:
            keys = sorted(_DECODER_KEYS)
            raise ValueError(f"caption_decoder: unknown keys {unknown}, missing {missing} (its keys: {keys})")
        visual = self.model.visual
        if not hasattr(visual, "output_tokens") or not hasattr(visual, "transformer"):
            raise ValueError(f"caption_decoder needs open_clip's ViT image tower (tokens); got {type(visual).__name__}")
        self._pad_id = pad_token_id(self.tokenizer)
        vocab = self.model.vocab_size
        dims = {k: int(cfg[k]) for k in ("width", "layers", "heads")}
        width, ctx, prefix = visual.transformer.width, self.context_length, bool(cfg.get("prefix"))
        ids = self._shortlist(cfg["vocab"]) if cfg.get("vocab") else None
        return CaptionDecoder(vocab, width, ctx, **dims, pad_id=self._pad_id, prefix=prefix, output_ids=ids)

    def _shortlist(self, vocab: str | Sequence[str]) -> list[int]:
        """The token ids of the texts in ``vocab`` (files or globs), pads left out."""
        files = sorted({f for pattern in ([vocab] if isinstance(vocab, str) else vocab) for f in glob.glob(pattern)})
        if not files:
            raise FileNotFoundError(f"caption_decoder.vocab: no file matches {vocab!r}")
        # word by word (a text is cut at the context length); exact for open_clip's whitespace-first BPE tokenizer
        words = sorted({w for f in files for w in Path(f).read_text(encoding="utf-8").split()})
        ids = {int(i) for i in self.tokenizer(words).unique()} - {self._pad_id}
        rank_zero_info(f"ClipModule: the caption decoder predicts {len(ids)} token ids of {len(files)} files + other")
        return sorted(ids)

    @classmethod
    def validate_config(cls, args: dict[str, Any], run: RunContext) -> None:
        """Before anything is built (``experiments/validate.py``): ``model`` is known, ``init_from`` exists."""
        model = args.get("model")
        if isinstance(model, str) and model.startswith("local-dir:"):
            check_path("model", model.removeprefix("local-dir:"), "dir", what="an open_clip folder")
        else:
            try:
                cfg, _ = resolve_model_config(model)
            except (ValueError, FileNotFoundError, TypeError) as e:
                raise ConfigError("model", model, str(e)) from None
            conflict = logit_layout_conflict(cfg.get("nonscalar_logit_scale"), args.get("nonscalar_logit_scale", False))
            if conflict:
                raise ConfigError("model", model, conflict)
        check_path("init_from", args.get("init_from"), "file", what="the checkpoint to start from (stage 2: stage 1's)")
        if args.get("loss", "clip") not in LOSSES:
            raise ConfigError("loss", args["loss"], f"is not one of {', '.join(LOSSES)}")
        decoder = args.get("caption_decoder")
        if decoder and set(decoder) - _DECODER_KEYS:
            raise ConfigError("caption_decoder", decoder, f"has keys other than {sorted(_DECODER_KEYS)}")

    def data_transforms(self, stage: str) -> DataTransforms:
        image = self._parts.preprocess_train if stage == "fit" else self._parts.preprocess_val
        return DataTransforms(image=image, text=TokenizeOne(self._parts.tokenizer))

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            self.loss_fn = make_contrastive_loss(self.hparams.loss, self.trainer.global_rank, self.trainer.world_size)
        if stage == "fit" and self.hparams.total_samples and self.trainer.max_steps == -1:
            # Length in samples (the paper's unit): the step count follows the global batch of this hardware.
            steps = math.ceil(self.hparams.total_samples / self.global_batch_size())
            self.trainer.fit_loop.epoch_loop.max_steps = steps

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._forward(image, text)

    def _view_tokens(self, batch: dict[str, Any], view: str) -> torch.Tensor:
        if view == "text":
            return batch["text"]
        texts = batch.get("texts") or {}
        if view not in texts:
            raise KeyError(f"view {view!r} is not in batch['texts'] ({sorted(texts)}): add it to the data's views")
        return texts[view]

    def _encode_with_tokens(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLIP.forward's outputs plus the image tower's tokens from the same pass (CoCa's ``output_tokens``; the
        flag is set only for this call so that ``encode_image`` and the exported model stay plain)."""
        visual = self.model.visual
        visual.output_tokens = True
        try:
            pooled, image_tokens = visual(image)
        finally:
            visual.output_tokens = False
        out = {
            "image_features": F.normalize(pooled, dim=-1),
            "image_tokens": image_tokens,
            "text_features": self.model.encode_text(text, normalize=True),
            "logit_scale": self.model.logit_scale.exp(),
        }
        if self.model.logit_bias is not None:
            out["logit_bias"] = self.model.logit_bias
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        views = list(self.text_views)
        tokens = [self._view_tokens(batch, v) for v in views]
        text = tokens[0] if len(tokens) == 1 else torch.cat(tokens)  # every view in one text-tower pass
        dec = self.hparams.caption_decoder
        out = self._encode_with_tokens(batch["image"], text) if dec else self(batch["image"], text)
        bs = batch["image"].shape[0]
        features = dict(zip(views, out["text_features"].split(bs), strict=True))
        bias = out.get("logit_bias") if self.hparams.loss == "siglip" else None
        loss, per_view = multi_caption_loss(
            self.loss_fn, out["image_features"], features, self.text_views, out["logit_scale"], bias
        )
        if len(views) > 1 or dec:
            self.log("train/loss_contrastive", loss, batch_size=bs)
            self.log_dict({f"train/loss_{v}": v_loss for v, v_loss in per_view.items()}, batch_size=bs)
        if dec:
            target = self._view_tokens(batch, dec["target"])
            # cut the batch's all-pad tail: pad targets add nothing to the loss nor, causally, to earlier positions
            target = target[:, : int((target != self._pad_id).any(0).nonzero().max()) + 1]
            prefix = self._view_tokens(batch, dec["prefix"]) if dec.get("prefix") else None
            target, inputs = target[:, 1:], target[:, :-1]
            logits = self.decoder(out["image_tokens"], inputs, prefix, keep=target != self._pad_id)
            out_class = self.decoder.out_class
            dec_loss = caption_loss(logits, target, self._pad_id, out_class)
            self.log("train/loss_decoder", dec_loss, batch_size=bs)
            if out_class is not None:
                other = (out_class[target[target != self._pad_id]] == out_class.max()).float().mean()  # the last class
                self.log("train/decoder_other", other, batch_size=bs)
            loss = loss + float(dec.get("weight", 1.0)) * dec_loss
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        # Extras only on the loggers' steps (each self.log costs ~0.4 ms); samples/s since the previous such step.
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._seen = now, 0
            return loss
        trainer = self._trainer  # None when a test or benchmark calls the step directly
        self._seen += bs * (trainer.world_size if trainer is not None else 1)
        if (self.global_step + 1) % (trainer.log_every_n_steps if trainer is not None else 1) == 0:
            # the temperature is [] or [1] (nonscalar_logit_scale): log it 0-dim
            self.log("train/logit_scale", out["logit_scale"].detach().reshape(()), batch_size=bs)
            if "logit_bias" in out:  # SigLIP's
                self.log("train/logit_bias", out["logit_bias"].detach().reshape(()), batch_size=bs)
            self.log("train/samples_per_sec", self._seen / (now - self._t0), batch_size=bs)
            self._t0, self._seen = now, 0
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # open_clip clamps the temperature at 100 after each step (in place: [] or [1])
            self.model.logit_scale.clamp_(0, math.log(100))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of the other logit-scale layout loads: the logit parameters and their optimizer state are
        reshaped [] <-> [1]. Nothing else is relaxed: strict loading stays strict."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict) or not reshape_logit_params(state, self._nonscalar, prefix="model."):
            return
        rank_zero_info(f"ClipModule: checkpoint logit_scale reshaped to {'[1]' if self._nonscalar else '[]'}")
        groups = self._named_param_groups()
        for opt_state in checkpoint.get("optimizer_states") or []:
            # the saved ids are indices (a plain optimizer) or FQNs (FSDP's full optimizer state), in the order
            # configure_optimizers put the parameters; another layout is left for Lightning to report
            saved, per_param = opt_state.get("param_groups", []), opt_state.get("state", {})
            if [len(g.get("params", [])) for g in saved] != [len(g) for g in groups]:
                continue
            for key, (name, _) in zip([k for g in saved for k in g["params"]], sum(groups, []), strict=True):
                if name in LOGIT_PARAMS and key in per_param and (not isinstance(key, str) or key.endswith(name)):
                    entry = per_param[key]  # exp_avg, exp_avg_sq; "step" is a 0-dim count in every layout
                    reshape_logit_params(entry, self._nonscalar, names=[k for k in entry if k != "step"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch["image"], batch["text"])
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        bs = len(logits)
        self.log("val/loss", loss, batch_size=bs, sync_dist=True)
        self.log("val/i2t_in_batch_top1", (logits.argmax(1) == labels).float().mean(), batch_size=bs, sync_dist=True)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images).float(), dim=-1)  # fp32 scores even under bf16 autocast

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        batch_size = batch_size or self.hparams.eval_batch_size
        feats = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            feats.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(feats) if feats else torch.empty(0, self.model.text_projection.shape[-1])

    @torch.no_grad()
    def evaluate(self, tasks: Sequence[Any]) -> dict[str, float]:
        from lightning_modules.evaluation import run_tasks

        precision = self.trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()
        with evaluating(self), precision:
            return run_tasks(
                tasks,
                encode_images=self.encode_images,
                encode_texts=self.encode_texts,
                image_transform=self._parts.preprocess_val,
                tokenizer=self.tokenizer,
                context_length=self.context_length,
                batch_size=self.hparams.eval_batch_size,
                device=self.device,
            )

    # ``python -m experiments test`` with ``EvalDataModule``: the tasks' image sets split across ranks, then gathered.
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, index = batch
        self._test_features.setdefault(dataloader_idx, []).append((index, self.encode_images(images)))

    def on_test_epoch_end(self) -> None:
        tasks = getattr(self.trainer.datamodule, "tasks", None)
        if tasks is None:
            raise ValueError("test needs a datamodule with evaluation `tasks` (datamodules.eval_sets.EvalDataModule)")
        from lightning_modules.evaluation import features_by_index

        metrics: dict[str, float] = {}
        for i, task in enumerate(tasks):
            parts = self._test_features.get(i, [])
            index = torch.cat([p[0] for p in parts]).to(self.device)
            feats = torch.cat([p[1] for p in parts])
            if self.trainer.world_size > 1:  # each rank holds a share (DistributedSampler pads with repeats)
                index = self.all_gather(index).flatten()
                feats = self.all_gather(feats).flatten(0, -2)
            n = len(self.trainer.test_dataloaders[i].dataset)
            features = features_by_index(task.name, n, [(index, feats)])
            with torch.no_grad():
                result = task.compute(features, self.encode_texts, self.tokenizer, self.context_length)
            metrics.update({f"{task.name}/{k}": float(v) for k, v in result.items()})
        self._test_features.clear()
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, sync_dist=False)
        if self.trainer.is_global_zero:
            self.save_metrics(metrics, "test")

    def global_batch_size(self) -> int:
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise ValueError("lr_per_256 / *_samples need the datamodule's batch_size to know the global batch")
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        hp = self.hparams
        uses_samples = hp.lr_per_256 is not None or hp.warmup_samples or hp.total_samples
        global_batch = self.global_batch_size() if uses_samples else None
        peak = hp.lr if hp.lr is not None else hp.lr_per_256 * global_batch / 256
        if hp.total_samples:
            total = math.ceil(hp.total_samples / global_batch)
        elif self.trainer.max_steps and self.trainer.max_steps > 0:
            total = self.trainer.max_steps
        else:
            total = self.trainer.estimated_stepping_batches
        warmup = math.ceil(hp.warmup_samples / global_batch) if hp.warmup_samples else hp.warmup_steps
        scaled = f" (= {hp.lr_per_256:g} x {global_batch} / 256)" if hp.lr_per_256 is not None else ""
        rank_zero_info(f"ClipModule: peak lr {peak:.4g}{scaled}, warm-up {warmup} steps, cosine to 0 at step {total}")
        decay, no_decay = ([p for _, p in group] for group in self._named_param_groups())
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=peak, betas=tuple(hp.betas), eps=hp.eps)
        return per_step(opt, lambda step: cosine_with_warmup(step, warmup, total))

    def _named_trained(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The model's parameters, then the decoder's as ``decoder.*``."""
        yield from self.model.named_parameters()
        if self.decoder is not None:
            yield from self.decoder.named_parameters(prefix="decoder")

    def _named_param_groups(self) -> list[list[tuple[str, torch.nn.Parameter]]]:
        """``[decay, no_decay]`` trainable ``(name, parameter)`` pairs, in the optimizer's order."""
        decay, no_decay = [], []
        for name, p in self._named_trained():
            if p.requires_grad:
                name = unwrapped_name(name)
                (no_decay if name in self._no_decay else decay).append((name, p))
        return [decay, no_decay]
