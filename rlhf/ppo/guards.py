"""The checks that stop a PPO run before a bad update (docs/design.md, details 5 and "guards").

Each raises ``PPOStopError`` with what was found and where; the step has not updated anything yet, so
the last checkpoint is intact and ``resume=true`` continues from it once the cause is fixed.
"""

from __future__ import annotations

import math

import torch

RATIO_CAUSES = (
    "dropout active in the policy, logprobs computed at a temperature other than the sampling one, "
    "padding or position ids that differ between rollout and training, a dtype/autocast mismatch between "
    "the rollout and training forward passes, or non-deterministic kernels"
)


class PPOStopError(RuntimeError):
    """A guard stopped training (non-finite values, ratio check); the last checkpoint is intact."""


def check_rollout(step: int, mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Scores, logprobs and values must be finite (on real tokens: padding may hold anything)."""
    for name, value in tensors.items():
        real = value if value.dim() == 1 else torch.where(mask.bool(), value, torch.zeros_like(value))
        if not torch.isfinite(real).all():
            raise PPOStopError(f"non-finite {name} in the rollout of step {step}; stopping before the update "
                               "(the last checkpoint is intact)")


def check_first_ratio(step: int, max_deviation: float, tolerance: float) -> None:
    """Before any update the new policy is the old one: pi_new / pi_old must be 1 (detail 5)."""
    if max_deviation > tolerance:
        raise PPOStopError(
            f"PPO ratio check failed at step {step}: on the first minibatch, before any update, "
            f"max |pi_new/pi_old - 1| = {max_deviation:.2e} > ratio_check_tolerance={tolerance:g}. "
            f"Likely causes: {RATIO_CAUSES}.")


def check_loss(step: int, loss: torch.Tensor, **parts: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        detail = ", ".join(f"{k} {float(v)}" for k, v in parts.items())
        raise PPOStopError(f"non-finite loss at step {step} ({detail}); stopping before the update "
                           "(the last checkpoint is intact)")


def check_metrics(step: int, metrics: dict) -> None:
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise PPOStopError(f"non-finite metrics at step {step}: {bad}; the last checkpoint is intact")
