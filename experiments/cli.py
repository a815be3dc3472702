"""The LightningCLI behind ``python -m experiments fit|validate|test|predict``: subclass mode for model and data, so
one entry point runs any LightningModule / LightningDataModule pair (``--model ClipModule`` or ``class_path`` in YAML),
stacked ``--config`` files (last wins), ``--print_config``."""

from __future__ import annotations

import contextlib
import copy
import io
import json
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
from experiments.paper_tables import expand_row
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
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN", "NEPTUNE_API_TOKEN")
SECRET_ENV += ("COMET_API_KEY", "AWS_SECRET_ACCESS_KEY")


def scrub_secrets(value: Any) -> Any:
    """Values under secret-looking keys, and text containing a credential of :data:`SECRET_ENV`, as ``"***"``."""
    env = [v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 8]

    def scrub(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: ("***" if _SECRET.search(str(k)) and v else scrub(v)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(scrub(v) for v in x)
        if isinstance(x, str) and any(secret in x for secret in env):
            return "***"
        return x

    return scrub(value)


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Save the resolved config next to the run and into every logger's hyperparameters, secrets scrubbed (replaces
    Lightning's ``setup``, which writes the raw config)."""

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
    """LightningCLI with the suite's defaults: config saved to the loggers, secrets scrubbed, the config validated
    before anything is built, checkpoints (``--ckpt_path``) read with ``weights_only=True``."""

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        """Lightning's parsing, with a paper table row expanded (``--row table3/p0.8``, ``expand_row``) and dotted keys
        into nested dicts merged (``merge_nested_dict_overrides``)."""
        if args is not None and not isinstance(args, list | tuple):
            return super().parse_arguments(parser, args)
        try:
            argv = merge_nested_dict_overrides(parser, expand_row(list(sys.argv[1:] if args is None else args)))
        except ValueError as e:  # a bad --row, or a DottedKeyError
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        self.config = parser.parse_args(argv)
        return None

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


# ``--a.b.c...`` (or ``--a.b.c=...``): a dotted option at least three levels deep, which may reach into a dict value
_DEEP_OPTION = re.compile(r"^--([A-Za-z_][\w-]*(?:\.[\w-]+){2,})(?:=(.*))?$", re.DOTALL)


class DottedKeyError(ValueError):
    """A dotted command-line key that cannot be merged into the dict it reaches into."""


def _quiet_parse(parser: Any, argv: list[str]) -> Any:
    """``parser.parse_args(argv)`` without printing anything and without ``--print_config``; None if it fails."""
    argv = [a for a in argv if a != "--print_config" and not a.startswith("--print_config=")]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return parser.parse_args(argv)
    except (SystemExit, Exception):  # noqa: BLE001 - the real parse reports it
        return None


def _subcommand_config(cfg: Any) -> Any:
    sub = cfg.get("subcommand") if cfg is not None else None
    return cfg.get(sub) if sub else cfg


def _dict_prefix(cfg: Any, parts: list[str]) -> int | None:
    """The length of the shortest prefix of ``parts`` whose value in ``cfg`` is a plain dict with at least two more
    key levels below it (``model.init_args.model`` + ``vision_cfg.patch_size``), or None."""
    from jsonargparse import Namespace

    for j in range(1, len(parts) - 1):
        value = cfg.get(".".join(parts[:j]))
        if isinstance(value, dict):
            return j
        if not isinstance(value, Namespace):
            return None
    return None


def merge_nested_dict_overrides(parser: Any, argv: list[str]) -> list[str]:
    """``argv`` with every dotted override two or more levels into a dict-valued setting rewritten, at the same
    position, as the whole dict with that key merged in. jsonargparse replaces the sub-dict of such a key
    (``--model.init_args.model.vision_cfg.patch_size=4`` left ``vision_cfg`` as ``{patch_size: 4}``, silently another
    model); here the configured one keeps its other keys. A path through a non-dict raises :class:`DottedKeyError`."""
    if not any(_DEEP_OPTION.match(a) for a in argv):
        return argv
    full = _subcommand_config(_quiet_parse(parser, argv))
    if full is None:  # it does not parse: the real parse reports why
        return argv
    out, i = list(argv), 0
    while i < len(out):
        m = _DEEP_OPTION.match(out[i])
        parts = m.group(1).split(".") if m else []
        j = _dict_prefix(full, parts) if m else None
        inline = m is not None and m.group(2) is not None
        if j is None or not (inline or (i + 1 < len(out) and not out[i + 1].startswith("--"))):
            i += 1
            continue
        raw, width = (m.group(2), 1) if inline else (out[i + 1], 2)
        before = _subcommand_config(_quiet_parse(parser, out[:i]))
        if before is None:  # the arguments before it do not parse on their own: leave it to jsonargparse
            i += width
            continue
        key, inner = ".".join(parts[:j]), parts[j:]
        merged = _merge_dotted(before.get(key), key, inner, yaml.safe_load(raw) if raw.strip() else raw, m.group(1))
        out[i : i + width] = [f"--{key}={json.dumps(merged)}"]
        i += 1
    return out


def _merge_dotted(base: Any, key: str, inner: list[str], value: Any, option: str) -> dict[str, Any]:
    """A deep copy of the dict ``base`` (the value of ``key``) with ``value`` set at the key path ``inner``."""
    if base is not None and not isinstance(base, dict):
        raise DottedKeyError(
            f"--{option}: {key} is {base!r}, not a dict, so a dotted key cannot set {'.'.join(inner)} in it; "
            f"pass the whole value instead, e.g. --{key}='{{...}}'"
        )
    merged = copy.deepcopy(base or {})
    node = merged
    for depth, part in enumerate(inner[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join([key, *inner[: depth + 1]])
            raise DottedKeyError(
                f"--{option}: {where} is {child!r}, not a dict, so a dotted key cannot set "
                f"{'.'.join(inner[depth + 1 :])} in it; set --{where}=VALUE, or pass the whole dict: --{key}='{{...}}'"
            )
        node = child
    node[inner[-1]] = value
    return merged


def cli_main(args: ArgsType = None, run: bool = True) -> RecapCLI:
    """Run (or, with ``run=False``, only instantiate) the suite's LightningCLI."""
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
