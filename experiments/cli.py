"""The LightningCLI behind ``python -m experiments fit|validate|test|predict``.

Subclass mode for both model and data, so one entry point runs any LightningModule / LightningDataModule pair:
``--model ClipModule`` or ``model: {class_path: lightning_modules.clip.ClipModule, init_args: ...}`` in YAML,
with stacked ``--config`` files (last wins) and ``--print_config``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import lightning as L
import yaml
from jsonargparse import set_parsing_settings
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger

# Import the suite's modules so that short class names (``--model ClipModule``) resolve in subclass mode.
import datamodules.caption_mix  # noqa: F401
import datamodules.eval_sets  # noqa: F401
import datamodules.latent_cache  # noqa: F401
import datamodules.llava_json  # noqa: F401
import datamodules.prompts  # noqa: F401
import lightning_modules.captioner  # noqa: F401
import lightning_modules.clip  # noqa: F401
import lightning_modules.dit  # noqa: F401

# Constructor docstrings become --help text (litgpt does the same).
set_parsing_settings(docstring_parse_attribute_docstrings=True)

_SECRET = re.compile(r"(api[_-]?key|token|secret|password|credential)", re.IGNORECASE)


def scrub_secrets(value: Any) -> Any:
    """Replace values under secret-looking keys, so W&B keys and tokens never reach a logged or saved config."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET.search(str(k)) and v else scrub_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_secrets(v) for v in value]
    return value


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config next to the run and into every logger's hyperparameters, secrets scrubbed.

    Replaces Lightning's ``setup`` (which writes the raw config) so that nothing unscrubbed is ever written.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
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


class RecapCLI(LightningCLI):
    """LightningCLI with the suite's defaults: subclass mode, config saved to the loggers, secrets scrubbed."""


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
