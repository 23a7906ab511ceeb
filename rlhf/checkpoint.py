"""Atomic checkpoints and full resume through ``accelerate``'s save_state / load_state.

A checkpoint holds the models, the optimiser, RNG states of every process and every registered object
(scheduler, KL controller, progress). It is written to ``step-N.tmp`` and renamed when complete, and a
``latest`` file is replaced atomically, so a run killed at any moment leaves the last good checkpoint.
"""

from __future__ import annotations

import os
import shutil


class Progress:
    """The training position (PPO step); the prompt order is a pure function of (seed, step)."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def save_checkpoint(accelerator, output_dir: str, step: int, keep: int = 2) -> str:
    root = checkpoint_dir(output_dir)
    final = os.path.join(root, f"step-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = os.path.join(root, "latest")
        with open(pointer + ".tmp", "w") as f:
            f.write(os.path.basename(final))
        os.replace(pointer + ".tmp", pointer)
        old = sorted((d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp")),
                     key=lambda d: int(d.split("-")[1]))
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output_dir: str) -> str | None:
    pointer = os.path.join(checkpoint_dir(output_dir), "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(checkpoint_dir(output_dir), f.read().strip())
    return path if os.path.isdir(path) else None
