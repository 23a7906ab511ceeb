"""``rlhf estimate-memory``: read a model's config (no weights) and print the per-device estimate.

The arithmetic is ``rlhf.memory`` (formula in docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .memory import DEFAULT_LORA_TARGETS, GIB, LINEARS, MemoryEstimate, ModelShape, estimate
from .paths import is_local_path


def format_table(est: MemoryEstimate) -> str:
    """The estimate as a plain-text table per device, in GiB (MiB below 1 GiB)."""
    unit, scale = ("GiB", GIB) if est.total >= GIB else ("MiB", 2**20)

    def size(x: float) -> str:
        return f"{x / scale:14.3f}"

    topo = f", topology {est.topology}" if est.topology else ""
    lines = [f"stage {est.stage}, method {est.method}{topo}, {est.dtype}, ZeRO-{est.zero} over {est.gpus} GPU(s), "
             f"batch {est.batch} x seq {est.seq} per device" + (f", {est.grad_accum} accumulated" if est.grad_accum > 1
                                                                else ""),
             f"{'models (ZeRO-3 shards them)' if est.zero == 3 else 'models':<40}{'params':>14}{'trainable':>14}"]
    lines += [f"  {p.name:<38}{p.params:>14,}{p.trainable:>14,}" for p in est.parts]
    lines.append(f"{'component':<40}{unit + '/device':>14}")
    for name in ("weights", "gradients", "optimizer", "activations", "overhead"):
        lines.append(f"  {name:<38}{size(getattr(est, name))}")
    rule = "W + O + G + A" if est.grad_accum > 1 else "W + O + max(G, A)"
    lines.append(f"  {'total = ' + rule + ' + overhead':<38}{size(est.total)}")
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
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    targets = LINEARS if args.lora_targets == "all" else tuple(t.strip() for t in args.lora_targets.split(","))
    try:
        shape = ModelShape.from_config(load_config(args.model, args.config_json))
        est = estimate(shape, args.stage, args.method, args.dtype, args.zero, args.gpus, args.batch, args.seq,
                       args.lora_r, targets, args.topology, args.attn, not args.no_reward_model, args.grad_accum,
                       args.response_len)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(), indent=2) if args.json else format_table(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
