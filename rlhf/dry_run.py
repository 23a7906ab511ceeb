"""Dry run of one stage: parse and validate its configuration, then resolve its models and data.

Nothing is trained or downloaded. A Hub model or dataset that cannot be reached (no network, as in CI)
is reported and not counted as a problem; a local path that does not exist, an unknown config key, a
batch size that does not divide, or a data file that fails validation is.
"""

from __future__ import annotations

import os

from .config import parse_stage_args

KIND = {"sft": "sft", "reward": "preference", "ppo": "prompt"}


def _stage_types(name: str) -> list:
    from trl import ModelConfig, RewardConfig, SFTConfig

    from .config import PPOConfig, SFTScriptArguments

    if name == "sft":
        return [SFTScriptArguments, ModelConfig, SFTConfig]
    if name == "reward":
        from reward_models.train import RewardScriptArguments

        return [RewardScriptArguments, ModelConfig, RewardConfig]
    return [PPOConfig]


def check_model(label: str, path: str | None, produced: set[str]) -> int:
    if not path:
        return 0
    if path in produced:
        print(f"  {label}: {path} (written by an earlier stage)")
        return 0
    if path.startswith("tiny:"):
        print(f"  {label}: {path} (built offline)")
        return 0
    from transformers import AutoConfig

    local = os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # offline Hub, missing directory: tell which
        if local:
            print(f"  {label}: {path}: PROBLEM: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            return 1
        print(f"  {label}: {path} (Hub model; not reachable now, fetched at run time)")
        return 0
    print(f"  {label}: {path} ({config.model_type}, hidden {getattr(config, 'hidden_size', '?')}, "
          f"layers {getattr(config, 'num_hidden_layers', '?')})")
    return 0


def check_data(args, kind: str) -> int:
    from .data import DataFormatError
    from .data.readers import is_local
    from .data.sources import resolve_stage_data

    if args.dataset != "demo" and not is_local(args.dataset):
        print(f"  dataset: {args.dataset} (Hub dataset; not reachable now, loaded at run time)")
        return 0
    try:
        train, held_out, _, lines = resolve_stage_data(args, kind)
    except (DataFormatError, FileNotFoundError) as e:
        print(f"  dataset: PROBLEM: {e}")
        return 1
    print("  " + "\n  ".join(lines))
    print(f"  dataset: {len(train)} training and {len(held_out)} held-out {kind} records")
    return 0


def check_stage(name: str, argv: list[str], stages: dict, world_size: int = 1) -> int:
    extra = ["use_cpu=true"] if name in ("sft", "reward") else []  # bf16 configs validate on a CPU-only machine
    try:
        parsed = parse_stage_args(_stage_types(name), argv + extra)
    except (ValueError, SystemExit) as e:
        print(f"  config: PROBLEM: {e}")
        return 1
    args = parsed[0]
    print(f"  config: {argv[1]} parsed ({', '.join(type(p).__name__ for p in parsed)})")
    out_dir = os.path.dirname(getattr(args, "output_dir", None) or parsed[-1].output_dir)
    produced = {os.path.join(out_dir, s) for s in stages}
    problems = 0
    model_args = parsed[1] if name != "ppo" else args
    problems += check_model("model", model_args.model_name_or_path, produced)
    if name == "ppo":
        try:
            print(f"  batch sizes per process: {args.derive(world_size)}")
        except ValueError as e:
            print(f"  config: PROBLEM: {e}")
            problems += 1
        for label in ("ref_model", "reward_model", "critic_model"):
            problems += check_model(label, getattr(args, label), produced)
    return problems + check_data(args, KIND[name])
