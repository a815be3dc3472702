"""The LightningCLI behind ``python -m experiments fit|validate|test|predict``.

Subclass mode for both model and data, so one entry point runs any LightningModule / LightningDataModule pair:
``--model ClipModule`` or ``model: {class_path: lightning_modules.clip.ClipModule, init_args: ...}`` in YAML,
with stacked ``--config`` files (last wins) and ``--print_config``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import lightning as L
import yaml
from jsonargparse import set_parsing_settings
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.parsing import AttributeDict

# Import the suite's modules so that short class names (``--model ClipModule``) resolve in subclass mode.
import datamodules.caption_mix  # noqa: F401
import datamodules.eval_sets  # noqa: F401
import datamodules.latent_cache  # noqa: F401
import datamodules.llava_json  # noqa: F401
import datamodules.prompts  # noqa: F401
import lightning_modules.captioner  # noqa: F401
import lightning_modules.clip  # noqa: F401
import lightning_modules.dit  # noqa: F401
from experiments.validate import validate_config

# Constructor docstrings become --help text (litgpt does the same).
set_parsing_settings(docstring_parse_attribute_docstrings=True)

# Keys that hold credentials: api_key, wandb_api_key, apikey, token, hf_token, access_token, secret, client_secret,
# password, credentials. Not tokenizer, tokenizer_kwargs, max_new_tokens or pad_token: configs need those verbatim.
_SECRET = re.compile(
    r"(^|[_.-])(api[_-]?key|apikey|secrets?|password|passwd|credentials?)($|[_.-])"
    r"|^token$|(^|[_.-])(auth|access|api|hf|hub|wandb|github|gh|bearer|refresh|session|secret)[_-]?token$",
    re.IGNORECASE,
)
# Environment variables that hold credentials; their values are scrubbed wherever they appear in a config.
SECRET_ENV = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "GITHUB_TOKEN",
    "NEPTUNE_API_TOKEN",
    "COMET_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
)


def scrub_secrets(value: Any) -> Any:
    """Replace values under secret-looking keys, and any text containing a credential from the environment
    (:data:`SECRET_ENV`), by ``"***"``, so W&B keys and tokens never reach a logged or saved config."""
    env = [v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 8]

    def scrub(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: ("***" if _SECRET.search(str(k)) and v else scrub(v)) for k, v in x.items()}
        if isinstance(x, list):
            return [scrub(v) for v in x]
        if isinstance(x, tuple):
            return tuple(scrub(v) for v in x)
        if isinstance(x, str) and any(secret in x for secret in env):
            return "***"
        return x

    return scrub(value)


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config next to the run and into every logger's hyperparameters, secrets scrubbed.

    Replaces Lightning's ``setup`` (which writes the raw config) so that nothing unscrubbed is ever written.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning logs the module's and datamodule's init arguments to every logger after setup: scrub them first.
        for obj in (pl_module, trainer.datamodule):
            if obj is not None and getattr(obj, "_hparams_initial", None):
                obj._hparams_initial = AttributeDict(scrub_secrets(dict(obj._hparams_initial)))
        if self.already_saved:
            return
        log_dir = trainer.log_dir if self.save_to_log_dir else None  # trainer.log_dir broadcasts from rank 0
        if trainer.is_global_zero:
            config = scrub_secrets(yaml.safe_load(self.parser.dump(self.config, skip_none=False)))
            if log_dir is not None:
                fs = get_filesystem(log_dir)
                fs.makedirs(log_dir, exist_ok=True)
                with fs.open(os.path.join(log_dir, self.config_filename), "w") as f:
                    yaml.safe_dump(config, f, sort_keys=False)
            for logger in trainer.loggers:
                if isinstance(logger, Logger):
                    logger.log_hyperparams({"config": config})
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Checkpoints carry the init arguments (``load_from_checkpoint``); never a credential among them."""
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint[key] = type(checkpoint[key])(scrub_secrets(dict(checkpoint[key])))


class RecapCLI(LightningCLI):
    """LightningCLI with the suite's defaults: subclass mode, config saved to the loggers, secrets scrubbed, the
    config validated before anything is built, checkpoints (``--ckpt_path``) read with ``weights_only=True``."""

    def before_instantiate_classes(self) -> None:
        # Runs after parsing and before any class (Trainer, loggers, callbacks, model, data) exists, so nothing has
        # been written yet: a config that cannot run stops here with one line per problem and exit code 2.
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        errors = validate_config(cfg, cfg.get("config") or [])
        if errors:
            print("\n".join(errors), file=sys.stderr)
            raise SystemExit(2)
        if self.subcommand and "weights_only" in cfg and cfg.get("weights_only") is None:
            cfg["weights_only"] = True  # Lightning's own default for a local ckpt_path is torch's; say it explicitly
        # A logger's own run config (WandbLogger's `config`, passed to wandb.init) is data that the logger writes
        # as is; its credentials go before the logger exists. Credentials a logger needs (api_key) are left alone.
        loggers = cfg.get("trainer.logger")
        for node in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(node, "init_args", None)
            if init_args is not None and isinstance(init_args.get("config"), Mapping):
                init_args["config"] = scrub_secrets(init_args["config"])


def cli_main(args: ArgsType = None, run: bool = True) -> RecapCLI:
    """Run (or, with ``run=False``, only instantiate) the suite's LightningCLI. Tests call this directly."""
    return RecapCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
