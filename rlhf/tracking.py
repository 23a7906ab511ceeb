"""Weights & Biases set-up: offline without an API key, online with one, never fatal.

Only the main process talks to W&B. If ``WANDB_API_KEY`` is set but W&B cannot be reached, the run
falls back to offline mode instead of failing.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def init_wandb(output_dir: str, project: str, group: str | None, name: str, config: dict, is_main: bool = True):
    """Start the W&B run of this stage (main process only); returns the run, or None when disabled."""
    if not is_main or wandb_mode() == "disabled":
        return None
    import wandb

    os.environ["WANDB_MODE"] = wandb_mode()  # the Trainer's WandbCallback reads the same setting
    os.environ.setdefault("WANDB_DIR", output_dir)
    os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)
    kwargs = dict(project=project, group=group, name=name, config=config, dir=os.environ["WANDB_DIR"], reinit="finish_previous")
    try:
        return wandb.init(mode=os.environ["WANDB_MODE"], settings=wandb.Settings(init_timeout=60, silent=True), **kwargs)
    except Exception as e:  # unreachable server, bad key: keep training, log locally
        logger.warning("W&B %s init failed (%s); continuing offline", os.environ["WANDB_MODE"], e)
        os.environ["WANDB_MODE"] = "offline"
        try:
            return wandb.init(mode="offline", **kwargs)
        except Exception as e2:
            logger.warning("W&B offline init failed too (%s); W&B logging disabled", e2)
            os.environ["WANDB_MODE"] = "disabled"
            return None


def log_table(run, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
    if run is None:
        return
    import wandb

    run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)


def log_summary(run, values: dict) -> None:
    if run is not None:
        run.summary.update(values)
