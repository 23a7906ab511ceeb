"""``rlhf estimate-memory``: read a model's config (no weights) and print the per-device estimate.

The arithmetic is ``rlhf.memory`` (formula in docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .memory import (
    DEFAULT_LORA_TARGETS,
    ESTIMATORS,
    GIB,
    LINEARS,
    MemoryEstimate,
    ModelShape,
    estimate,
    fit_verdict,
)
from .paths import is_local_path


def format_table(est: MemoryEstimate) -> str:
    """The estimate as a plain-text table per device, in GiB (MiB below 1 GiB)."""
    unit, scale = ("GiB", GIB) if est.total >= GIB else ("MiB", 2**20)

    def size(x: float) -> str:
        return f"{x / scale:14.3f}"

    topo = f", topology {est.topology}" if est.topology else ""
    topo += f", estimator {est.estimator}" if est.estimator != "gae" else ""
    engine = f"FSDP2 over {est.gpus} GPU(s)" if est.fsdp2 else f"ZeRO-{est.zero} over {est.gpus} GPU(s)"
    engine += ", activation checkpointing" if est.checkpointing else ""
    sharding = est.zero == 3 or est.fsdp2
    lines = [f"stage {est.stage}, method {est.method}{topo}, {est.dtype}, {engine}, "
             f"batch {est.batch} x seq {est.seq} per device" + (f", {est.grad_accum} accumulated" if est.grad_accum > 1
                                                                else ""),
             f"{'models':<40}{'params':>14}{'trainable':>14}" + ("  per device" if sharding else "")]
    lines += [f"  {p.name:<38}{p.params:>14,}{p.trainable:>14,}" + (
        ("  sharded" if p.sharded else "  full copy") if sharding else "") for p in est.parts]
    lines.append(f"{'component':<40}{unit + '/device':>14}")
    for name in ("weights", "gathered", "gradients", "optimizer", "activations", "overhead"):
        if name != "gathered" or est.gathered:
            label = "gathered in the forward (W_g)" if name == "gathered" else name
            lines.append(f"  {label:<38}{size(getattr(est, name))}")
    rule = ("W + O + G + A" if est.grad_accum > 1 else "W + O + max(G, A)") + (" + W_g" if est.gathered else "")
    if est.rollout_total is None:
        lines.append(f"  {'total = ' + rule + ' + overhead':<38}{size(est.total)}")
    else:
        lines.append(f"  {'update = ' + rule + ' + overhead':<38}{size(est.update_total)}")
        lines.append(f"  {'rollout = W_gen + O + max(KV, logits)':<38}{size(est.rollout_total)}   (W_gen "
                     f"{est.rollout_weights / scale:.3f} {unit})")
        lines.append(f"  {'total = max(update, rollout)':<38}{size(est.total)}")
    if est.separate_total is not None:
        saved = est.separate_total - est.total
        lines.append(f"  {'separate topology (full)':<38}{size(est.separate_total)}   ({est.topology} saves "
                     f"{saved / scale:.3f} {unit}, {100 * saved / est.separate_total:.0f}%)")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------- I/O: configs and the command line


def load_config(model: str | None = None, config_json: str | None = None) -> dict:
    """A model config as a dict, without downloading weights.

    ``config_json``: a config.json file (offline). ``model``: ``tiny:demo``, a local directory, or a Hub
    id (only config.json is fetched). Class defaults are filled in through transformers when it knows
    the model_type, so a config.json without ``tie_word_embeddings`` reads as its class declares.
    """
    if config_json:
        with open(config_json, encoding="utf-8") as f:
            raw = json.load(f)
        try:
            from transformers import AutoConfig

            return AutoConfig.for_model(**raw).to_dict()
        except (ValueError, KeyError, TypeError):  # unknown model_type: take the file as it is
            return raw
    if not model:
        raise ValueError("give --model ID_OR_PATH or --config-json FILE")
    from transformers import AutoConfig

    if model.startswith("tiny:"):
        from .models import resolve_model_path

        model = resolve_model_path(model)
    elif is_local_path(model) and not os.path.isdir(os.path.expanduser(model)):
        raise ValueError(f"{model}: no such model directory")
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as e:  # offline, gated, typo: say what to do instead
        raise ValueError(
            f"could not read the config of {model!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a local model directory as --model, or a config.json with --config-json FILE"
        ) from e
    get_text = getattr(config, "get_text_config", None)
    return (get_text() if get_text else config).to_dict()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf estimate-memory", allow_abbrev=False,
                                description="Per-device memory of one training step, from the model config "
                                            "(formula: docs/memory.md).")
    p.add_argument("--model", help="Hub id, local model directory, or tiny:demo (only the config is read)")
    p.add_argument("--config-json", help="a config.json to read instead of --model (offline)")
    p.add_argument("--stage", choices=["sft", "reward", "ppo"], default="sft")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="full")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0, help="DeepSpeed ZeRO stage")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel devices ZeRO shards over")
    p.add_argument("--batch", type=int, default=1, help="per-device micro-batch (reward: pairs)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (ppo: prompt + response)")
    p.add_argument("--response-len", type=int, help="ppo: response tokens, the positions given logits (default --seq)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (>1 holds G during backward)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                   help=f"comma-separated, from {','.join(LINEARS)} (default: peft's q,v); 'all' for every one")
    p.add_argument("--topology", choices=["separate", "lora", "shared"], help="ppo (default: lora for LoRA methods, "
                                                                           "else separate)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                   help="attention kernel: eager keeps the heads x seq x seq probabilities")
    p.add_argument("--no-reward-model", action="store_true", help="ppo scored by a function or API: no RM held")
    p.add_argument("--estimator", choices=ESTIMATORS, default="gae",
                   help="ppo advantage_estimator: the critic-free ones (grpo, dr_grpo, rloo, reinforce_pp) hold no critic")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="ppo: replies sampled per prompt")
    p.add_argument("--prompts", type=int, help="ppo: prompts per device per step (default: --batch / --samples-per-prompt)")
    p.add_argument("--rollout-forward-batch", type=int,
                   help="ppo: local_rollout_forward_batch_size, sequences per recompute forward (default --batch)")
    p.add_argument("--fsdp2", action="store_true", help="torch FSDP2 over --gpus instead of DeepSpeed (ppo: topology "
                                                        "separate or a critic-free estimator)")
    p.add_argument("--checkpointing", action="store_true", help="activation (gradient) checkpointing")
    p.add_argument("--device-memory", type=float, metavar="GIB",
                   help="memory per device in GiB: end with whether it fits, else the cheapest change that does")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    targets = LINEARS if args.lora_targets == "all" else tuple(t.strip() for t in args.lora_targets.split(","))
    try:
        shape = ModelShape.from_config(load_config(args.model, args.config_json))
        kwargs = dict(stage=args.stage, method=args.method, dtype=args.dtype, zero=args.zero, gpus=args.gpus,
                      batch=args.batch, seq=args.seq, lora_r=args.lora_r, lora_targets=targets, topology=args.topology,
                      attn=args.attn, reward_model=not args.no_reward_model, grad_accum=args.grad_accum,
                      response_len=args.response_len, fsdp2=args.fsdp2, checkpointing=args.checkpointing)
        if args.stage == "ppo":
            kwargs.update(estimator=args.estimator, samples_per_prompt=args.samples_per_prompt, prompts=args.prompts,
                          rollout_forward_batch=args.rollout_forward_batch)
        elif (args.estimator, args.samples_per_prompt, args.prompts, args.rollout_forward_batch) != ("gae", 1, None, None):
            raise ValueError("--estimator, --samples-per-prompt, --prompts and --rollout-forward-batch apply to "
                             "--stage ppo only")
        if args.device_memory is not None and args.device_memory <= 0:
            raise ValueError(f"--device-memory {args.device_memory}: give the memory per device in GiB, e.g. 80")
        est = estimate(shape, **kwargs)
        verdict = fit_verdict(shape, args.device_memory * GIB, **kwargs) if args.device_memory else None
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**est.to_dict(), **({"verdict": verdict[0]} if verdict else {})}, indent=2))
    else:
        print(format_table(est) + (f"\n{verdict[0]}" if verdict else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
