"""What the LightningModules share: in-loop evaluation with its metrics JSON, and parameter names without wrappers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def unwrapped_name(name: str) -> str:
    """A parameter name without the FSDP / activation-checkpointing wrappers' path parts (as in a full state dict)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def hparams_for(fn: Callable, hparams: Mapping[str, Any], strict: bool = False) -> dict[str, Any]:
    """The entries of ``hparams`` that ``fn`` takes (init args passed on by name to a builder). ``strict``: every
    parameter of ``fn`` must be among them, so a renamed argument fails loudly instead of taking ``fn``'s default."""
    accepted = inspect.signature(fn).parameters
    if strict and (missing := [k for k in accepted if k not in hparams]):
        raise TypeError(f"{fn.__qualname__} takes {missing}, which the module's arguments lack")
    return {k: v for k, v in hparams.items() if k in accepted}


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block, in its own mode again after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class InLoopEvaluation:
    """Mixin of a LightningModule with ``evaluation`` tasks, ``evaluate(tasks) -> {name: value}`` and the hparams
    ``eval_every_n_validations`` and ``metrics_dir``: the tasks run on rank 0 at every n-th validation, the last step
    and the final weights, logged as ``log_prefix + name`` and written to ``<metrics_dir>/step<N>.json``."""

    log_prefix = ""
    metrics_extra: tuple[str, ...] = ()
    _validations = 0
    _last_eval_step = -1

    def on_validation_epoch_end(self) -> None:
        if not self.evaluation or self.trainer.sanity_checking:
            return
        self._validations += 1
        last = self.trainer.max_steps > 0 and self.global_step >= self.trainer.max_steps
        if self._validations % max(1, self.hparams.eval_every_n_validations) == 0 or last:
            metrics = self._evaluate_in_loop()
            if metrics:
                self.log_dict({self.log_prefix + k: v for k, v in metrics.items()}, rank_zero_only=True)

    def on_train_end(self) -> None:
        # The final weights are always evaluated, even when the last step is not a validation step.
        if self.evaluation and self._last_eval_step != self.global_step:
            metrics = self._evaluate_in_loop()
            for logger in self.trainer.loggers:
                logger.log_metrics({self.log_prefix + k: v for k, v in metrics.items()}, step=self.global_step)
                logger.save()

    def _evaluate_in_loop(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.trainer.is_global_zero:
            metrics = self.evaluate(self.evaluation)
            self.save_metrics(metrics, f"step{self.global_step:08d}")
        self._last_eval_step = self.global_step
        self.trainer.strategy.barrier("in_loop_evaluation")
        return metrics

    def save_metrics(self, metrics: dict[str, Any], tag: str) -> None:
        from lightning_modules.evaluation import write_metrics_json

        root = self.hparams.metrics_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "metrics"
        extra = {k: self.hparams[k] for k in self.metrics_extra}
        write_metrics_json(dict(metrics), Path(root) / f"{tag}.json", step=self.global_step, tag=tag, **extra)
