"""Weights & Biases set-up (offline without an API key, online with one, never fatal), TensorBoard for PPO's own
loop, and the line each stage ends with saying where its runs are.

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
    run = _wandb_run(run)
    if run is None:
        return
    import wandb

    run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)


def log_summary(run, values: dict) -> None:
    run = _wandb_run(run)
    if run is not None:
        run.summary.update(values)


class Tracker:
    """PPO's trackers behind one ``log``/``finish`` (the HF Trainer of SFT and RM has its own callbacks): the W&B
    run and, with ``report_to: [tensorboard]``, a ``torch.utils.tensorboard`` writer in OUTPUT/tensorboard."""

    def __init__(self, wandb_run=None, tensorboard_dir: str | None = None):
        self.wandb, self.tensorboard = wandb_run, None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # needs `pip install tensorboard`

            self.tensorboard = SummaryWriter(tensorboard_dir)

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def init_tracking(output_dir: str, report_to: list[str], project: str, group: str | None, name: str, config: dict,
                  is_main: bool = True) -> Tracker | None:
    """The trackers ``report_to`` names, on the main process; None when there are none."""
    if not is_main or not set(report_to) & {"wandb", "tensorboard"}:
        return None
    run = init_wandb(output_dir, project, group, name, config) if "wandb" in report_to else None
    board = os.path.join(output_dir, "tensorboard") if "tensorboard" in report_to else None
    return Tracker(run, board)


def _wandb_run(run):
    return run.wandb if isinstance(run, Tracker) else run


def where_runs_went(output_dir: str) -> list[str]:
    """One line per local record of this stage: the W&B offline run and how to upload it, the TensorBoard logs
    and how to view them. Printed at the end of every stage (the main process)."""
    import glob

    lines = []
    wandb_root = os.path.join(os.environ.get("WANDB_DIR") or output_dir, "wandb")
    offline = sorted(glob.glob(os.path.join(wandb_root, "offline-run-*")), key=os.path.getmtime)
    if offline:
        lines.append(f"W&B ran offline: the run is in {offline[-1]}; upload it with `wandb sync {offline[-1]}`")
    boards = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(output_dir, "**", "events.out.tfevents.*"),
                                                            recursive=True)})
    if boards:
        root = os.path.commonpath(boards)
        lines.append(f"TensorBoard logs in {root}; view them with `tensorboard --logdir {root}`")
    return lines
