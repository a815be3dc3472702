"""The suite's loggers: a ``WandbLogger`` that goes offline by itself without a W&B key, and a ``CSVLogger`` that
puts each ``wandb agent`` run of a sweep in its own directory (in a YAML's list of loggers the first one's directory is
the run directory)."""

from __future__ import annotations

import os

from lightning.pytorch.loggers import CSVLogger, WandbLogger

DEFAULT_WANDB_HOST = "https://api.wandb.ai"


def wandb_has_credentials() -> bool:
    """Whether W&B credentials are configured (no network): ``WANDB_API_KEY``, an identity token file, or a ``wandb
    login`` netrc entry for ``WANDB_BASE_URL``."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # wandb's own netrc reader (what `wandb login` writes); its location moved between wandb releases
        from wandb.sdk.lib.wbauth import read_netrc_auth

        return bool(read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST)))
    except Exception:  # noqa: BLE001 -- an unreadable netrc or a moved helper means "no login found"
        return False


def wandb_offline_by_default() -> bool:
    """Offline when ``WANDB_MODE`` says so or no credentials are configured (``wandb sync <run dir>`` uploads later)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun", "online", "run"):
        return mode in ("offline", "dryrun")
    return not wandb_has_credentials()


class RecapWandbLogger(WandbLogger):
    """``WandbLogger`` offline unless credentials are configured, runs under ``save_dir``. The API key is never an
    argument (W&B reads ``WANDB_API_KEY`` or ``wandb login``), so it cannot end up in a saved config.

    Args:
        project: W&B project; ``None`` uses ``WANDB_PROJECT`` (``entity``: ``WANDB_ENTITY`` or the account's default).
        offline: ``True``/``False`` forces the mode; ``None``: offline without credentials or ``WANDB_MODE=offline``.
        run_id: Resume this W&B run id (``None``: a new run, or the sweep agent's run).
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "runs",
        project: str | None = "recap-suite",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        job_type: str | None = None,
        offline: bool | None = None,
        log_model: bool | str = False,
        run_id: str | None = None,
    ) -> None:
        self.offline_mode = wandb_offline_by_default() if offline is None else offline
        extra = dict(entity=entity, group=group, tags=tags, notes=notes, job_type=job_type, id=run_id)
        os.makedirs(save_dir, exist_ok=True)  # wandb falls back to a temp dir when `dir` does not exist
        extra = {k: v for k, v in extra.items() if v}
        super().__init__(
            name=name, save_dir=save_dir, project=project, offline=self.offline_mode, log_model=log_model, **extra
        )


class SweepCSVLogger(CSVLogger):
    """``CSVLogger`` in ``<save_dir>/<WANDB_SWEEP_ID>/<WANDB_RUN_ID>`` under ``wandb agent`` (one folder per sweep
    point), else ``<save_dir>/local/version_N``; a ``name`` / ``version`` given overrides the ids."""

    def __init__(self, save_dir: str = "runs/sweeps", name: str | None = None, version: str | None = None) -> None:
        name = name or os.environ.get("WANDB_SWEEP_ID") or "local"
        version = version or os.environ.get("WANDB_RUN_ID") or None
        super().__init__(save_dir=save_dir, name=name, version=version)
