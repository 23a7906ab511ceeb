"""The one place that talks to ``accelerate.Accelerator``: global statistics across processes.

Whitening and logged metrics must be global (DESIGN principle 3): every process contributes its sums and
counts, so 1 process with batch 2B and 2 processes with batch B each compute the same numbers.
"""

from __future__ import annotations

import torch


def make_accelerator(gradient_accumulation_steps: int):
    from accelerate import Accelerator

    return Accelerator(gradient_accumulation_steps=gradient_accumulation_steps)


def global_masked_mean_var(accelerator, x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True):
    """Mean and variance of the masked entries of ``x`` over all processes (two passes, fp64 sums)."""
    mask = mask.to(torch.float64)
    x = x.to(torch.float64)
    totals = accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]), reduction="sum")
    n = totals[1].clamp(min=1)
    mean = totals[0] / n
    squares = accelerator.reduce(((x - mean) ** 2 * mask).sum(), reduction="sum")
    var = squares / n
    if unbiased and totals[1] > 1:
        var = var * n / (n - 1)
    return mean.float(), var.float()


def global_means(accelerator, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Average each scalar over processes (each process's value weighted equally)."""
    if not values:
        return {}
    keys = sorted(values)
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    reduced = accelerator.reduce(local, reduction="mean")
    return {k: float(v) for k, v in zip(keys, reduced.tolist())}


def global_sum(accelerator, value: float) -> float:
    return float(accelerator.reduce(torch.tensor(float(value), dtype=torch.float64, device=accelerator.device),
                                    reduction="sum"))
