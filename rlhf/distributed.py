"""The one place that talks to ``accelerate.Accelerator``: global statistics across processes.

Whitening and logged metrics must be global (docs/design.md, principle 3): every process contributes its sums and
counts, so 1 process with batch 2B and 2 processes with batch B each compute the same numbers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def process_state():
    """accelerate's PartialState, honouring ACCELERATE_USE_CPU (a bare PartialState() ignores it, and being
    a singleton, the first one created decides for the whole process: CPU DDP would silently become 2 runs)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def make_accelerator(gradient_accumulation_steps: int, mixed_precision: str | None = None):
    """The PPO stage's Accelerator; ``mixed_precision`` from the stage config wins over the launch config's."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise ValueError("fp16 mixed precision needs a CUDA device (its grad scaler); on CPU use bf16")
    return accelerator


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
    return global_sums(accelerator, [value])[0]


def global_sums(accelerator, values: list[float]) -> list[float]:
    """Each value summed over processes, in one collective."""
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(local, reduction="sum").tolist()


@contextmanager
def unwrap_for_generation(model, accelerator):
    """The bare model for ``generate``; under DeepSpeed ZeRO-3 its sharded parameters are gathered first.

    After TRL's ``unwrap_model_for_generation`` (trl/models/utils.py), which assumes a transformers model.
    """
    unwrapped = accelerator.unwrap_model(model)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield unwrapped
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(model.parameters()):
        remove_hooks(model)
        yield unwrapped
        add_hooks(model)
