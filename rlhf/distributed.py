"""The one place that talks to accelerate's state and to the sharding engines: process groups, global
statistics, and full parameters when a step needs them.

Whitening and logged metrics must be global (docs/design.md, principle 3): every process contributes its
sums and counts, so 1 process with batch 2B and 2 processes with batch B each compute the same numbers.

Sharding (docs/design.md, "Parallelism"): DeepSpeed ZeRO-2/3 through accelerate's ``prepare``; FSDP2
through torch's ``fully_shard`` applied here, because accelerate 1.16 switches to FSDP only for GPU device
types (on CPU it silently runs plain DDP); the PPO loop then keeps its accelerator for the process group
and the collectives only.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from contextlib import contextmanager

import torch


def _flag(name: str) -> bool:
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env(name)


def deepspeed_on_cpu() -> bool:
    return _flag("ACCELERATE_USE_DEEPSPEED") and not torch.cuda.is_available()


def fsdp2_requested() -> bool:
    """An FSDP accelerate config with fsdp_version 2 (accelerate launch exports it as environment variables)."""
    return _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") == "2"


def process_state():
    """accelerate's PartialState, created first so that it decides for the whole process (it is a singleton).

    It honours ACCELERATE_USE_CPU (a bare PartialState() ignores it: CPU DDP would silently become 2 runs),
    and under DeepSpeed on CPU it asks for gloo (a bare one leaves the backend None, and every rank then
    believes it is alone). ACCELERATE_USE_CPU=1 with DeepSpeed is refused: accelerate then drops DeepSpeed
    for plain DDP without a word.
    """
    from accelerate import PartialState

    if deepspeed_on_cpu():
        if _flag("ACCELERATE_USE_CPU"):
            raise RuntimeError("ACCELERATE_USE_CPU=1 turns DeepSpeed into plain DDP without a word; unset it "
                               "(DeepSpeed runs on CPU over gloo by itself)")
        # DeepSpeed JIT-compiles a shared-memory allreduce for CPU (~40 s on 2 cores) that gloo does not need
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        return PartialState(backend="gloo")
    # with no accelerator present CPU is the only choice: a launch config written for GPUs (or cpu.yaml, which
    # must say MULTI_GPU for accelerate to start several processes) then still runs DDP over gloo
    no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return PartialState(cpu=_flag("ACCELERATE_USE_CPU") or no_accelerator)


def make_accelerator(gradient_accumulation_steps: int, mixed_precision: str | None = None,
                     micro_batch_size: int = 1, max_grad_norm: float = 1.0):
    """The PPO stage's Accelerator; ``mixed_precision`` from the stage config wins over the launch config's.

    Under DeepSpeed the batch arithmetic the PPO loop does by hand is written into the DeepSpeed config
    (there is no dataloader for accelerate to read it from), and the process count is checked against the
    launcher's: every broken set-up seen so far exits 0 with each rank training alone.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    process_state()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed_on_cpu() else []
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision,
                              kwargs_handlers=handlers)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=micro_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
                  train_batch_size=micro_batch_size * gradient_accumulation_steps * accelerator.num_processes,
                  gradient_clipping=max_grad_norm)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} process(es) but {launched} were launched: "
                           "check the accelerate config (CPU runs need ACCELERATE_USE_CPU=1, DeepSpeed on CPU must not)")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise ValueError("fp16 mixed precision needs a CUDA device (its grad scaler); on CPU use bf16")
    return accelerator


def compute_precision(accelerator):
    """The training forward's autocast, for every forward that feeds PPO's arithmetic (reference, reward
    model, generation). accelerate's own ``autocast()`` is a no-op under DeepSpeed, whose engine casts the
    trained model itself; the models it does not hold must follow by autocast."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=accelerator.device.type, dtype=dtype)


@contextmanager
def whole_model_loading():
    """Load and run a whole model on one process alone (the SFT stage's evaluation from disk): once a ZeRO-3
    plugin exists every ``from_pretrained`` is partitioned and every ``generate`` synchronised across ranks --
    collectives the other ranks never join."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def parallelism(accelerator) -> dict:
    """How a stage ran, for its summary: a set-up that silently fell back to one process shows here."""
    return {"distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
            "zero_stage": zero_stage(accelerator)}


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else 0


def shard_fsdp2(model: torch.nn.Module, block_names: set[str], roots: list[torch.nn.Module]) -> torch.nn.Module:
    """torch's FSDP2: every decoder block (``_no_split_modules``) its own unit, then each module the wrapper
    calls directly (``roots``: the policy, the critic's backbone and head) a root of its own, so parameters,
    gradients and optimizer states are sharded over the processes. A root is gathered only when it is
    itself called, and generation calls the policy alone. Create the optimizer after."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"FSDP2: no module of the types {sorted(block_names)} to wrap")
    for block in blocks:
        fully_shard(block)
    for root in roots:
        fully_shard(root)
    return model


def sharding_summary(model: torch.nn.Module) -> dict:
    """How the trained parameters are held on this process: for the run's summary and the tests."""
    params = list(model.parameters())
    dtensor = sum(type(p).__name__ == "DTensor" for p in params)
    zero3 = sum(hasattr(p, "ds_numel") for p in params)
    local = sum(p.numel() if not hasattr(p, "to_local") else p.to_local().numel() for p in params)
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    return {"fsdp2_parameters": dtensor, "zero3_parameters": zero3, "local_elements": local, "full_elements": full}


@contextmanager
def gathered(model, accelerator):
    """Full parameters on every process for the duration (generation, saving); a no-op unless ZeRO-3 or
    FSDP2 shards them. Every process must enter it: gathering is collective."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if fsdp:  # unsharded until the end, not resharded after each forward (generate's forwards differ per rank)
        for m in fsdp:
            m.set_reshard_after_forward(False)
            m.unshard()
        try:
            yield
        finally:
            for m in fsdp:
                m.reshard()
                m.set_reshard_after_forward(True)
        return
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        yield


@contextmanager
def unwrap_for_generation(model, accelerator):
    """The bare model for ``generate``, with its parameters gathered when they are sharded.

    After TRL's ``unwrap_model_for_generation`` (trl/models/utils.py): under ZeRO-3 the parameter hooks are
    removed while generating, so each new token does not gather every layer again.
    """
    unwrapped = accelerator.unwrap_model(model)
    with gathered(model, accelerator):
        if zero_stage(accelerator) != 3:
            yield unwrapped
            return
        from trl.models.utils import add_hooks, remove_hooks

        remove_hooks(model)
        try:
            yield unwrapped
        finally:
            add_hooks(model)


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
