"""The ``rlhf`` command: ``rlhf --help`` lists the subcommands.

Training stages are meant to run under ``accelerate launch scripts/<stage>.py``; ``rlhf demo``
launches them that way on the embedded default task.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft_main(argv: list[str] | None = None) -> dict:
    """Parse the SFT config (YAML + overrides) and run the stage."""
    from trl import ModelConfig, SFTConfig

    from .config import SFTScriptArguments, parse_stage_args
    from .sft import run_sft

    script_args, model_args, training_args = parse_stage_args([SFTScriptArguments, ModelConfig, SFTConfig], argv)
    return run_sft(script_args, model_args, training_args)


def reward_main(argv: list[str] | None = None) -> dict:
    """Parse the reward-model config (YAML + overrides) and run the stage."""
    from trl import ModelConfig, RewardConfig

    from reward_models.train import RewardScriptArguments, run_reward

    from .config import parse_stage_args

    script_args, model_args, training_args = parse_stage_args([RewardScriptArguments, ModelConfig, RewardConfig], argv)
    return run_reward(script_args, model_args, training_args)


def ppo_main(argv: list[str] | None = None) -> dict:
    """Parse the PPO config (YAML + overrides) and run the stage."""
    from .config import PPOConfig, parse_stage_args
    from .ppo.run import run_ppo

    (cfg,) = parse_stage_args([PPOConfig], argv)
    return run_ppo(cfg)


def cmd_data_inspect(args) -> int:
    from .data import DataFormatError, load_records, turn_stats

    status = 0
    for path in args.paths:
        try:
            records, report = load_records(path, format=args.format, max_records=args.max_records)
        except DataFormatError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        print("\n".join(report.summary_lines()))
        for key, value in turn_stats(records).items():
            print(f"  {key:<18} {value}")
        if args.json:
            print(json.dumps({**report.to_dict(), **turn_stats(records)}, ensure_ascii=False))
    return status


def cmd_eval_rm(args) -> int:
    """Accuracy (ties count as wrong), mean margin, a per-subset table and a calibration plot."""
    from reward_models.evaluate import calibration_plot, evaluate_pairs, print_report
    from reward_models.scoring import RewardScorer

    from .data import DataFormatError, load_records

    pairs = []
    try:
        for path in args.data:
            records, report = load_records(path, format=args.format, kind="preference", max_records=args.max_records)
            print("\n".join(report.summary_lines()))
            name = os.path.basename(path)
            pairs += [{**r, "subset": r.get("subset") or (name if len(args.data) > 1 else "")} for r in records]
    except DataFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    scorer = RewardScorer(args.model, device=args.device, max_length=args.max_length)
    result = evaluate_pairs(scorer, pairs, batch_size=args.batch_size)
    print_report(result, title=f"{args.model} (revision {scorer.revision}) on {len(pairs)} pairs")
    print(f"calibration plot: {calibration_plot(result['margins'], args.plot)}")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "margins"}))
    return 0


def cmd_demo(args) -> int:
    """The embedded default end to end: ``rlhf pipeline --config configs/demo/pipeline.yaml``."""
    from .pipeline import main

    config = os.path.join(REPO_ROOT, "configs", "demo", "pipeline.yaml")
    return main(["--config", config, *args.overrides])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="SFT -> reward model -> PPO for dialogue models.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect and validate data files").add_subparsers(dest="data_command", required=True)
    inspect = data.add_parser("inspect", help="record counts, turn statistics and defect counts of data files")
    inspect.add_argument("paths", nargs="+", help="local files (json, jsonl, jsonl.gz, parquet) or Hub dataset ids")
    inspect.add_argument("--format", default="auto", help="override format detection")
    inspect.add_argument("--max-records", type=int, default=None)
    inspect.add_argument("--json", action="store_true", help="also print one JSON line per file")
    inspect.set_defaults(func=cmd_data_inspect)

    eval_rm = sub.add_parser("eval-rm", help="evaluate a reward model on preference pairs")
    eval_rm.add_argument("--model", required=True, help="reward model directory or Hub id")
    eval_rm.add_argument("--data", required=True, nargs="+", help="preference files (several: one subset each)")
    eval_rm.add_argument("--format", default="auto")
    eval_rm.add_argument("--max-records", type=int, default=None)
    eval_rm.add_argument("--max-length", type=int, default=None, help="longer pairs are cut from the left")
    eval_rm.add_argument("--batch-size", type=int, default=32)
    eval_rm.add_argument("--device", default=None)
    eval_rm.add_argument("--plot", default="calibration.png", help="where to write the calibration plot (PNG)")
    eval_rm.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    eval_rm.set_defaults(func=cmd_eval_rm)

    # stage commands hand their arguments to the stage's own config parser (see PASSTHROUGH)
    sub.add_parser("sft", help="SFT stage in this process (under accelerate: scripts/sft.py); --help for options")
    sub.add_parser("reward", help="reward-model stage in this process (under accelerate: scripts/reward.py)")
    sub.add_parser("ppo", help="PPO stage in this process (under accelerate: scripts/ppo.py)")
    sub.add_parser("eval", help="compare a policy with a baseline on held-out prompts (RM, gold, KL, distinct-n, BLEU)")
    sub.add_parser("estimate-memory", help="memory per device for a model, stage and method (no weights downloaded)")
    sub.add_parser("pipeline", help="SFT -> reward -> PPO from a pipeline YAML, then a report (--dry-run to validate)")
    sub.add_parser("serve", help="reward-model scoring API (same as scripts/serve_reward.py); --help for options")

    demo = sub.add_parser("demo", help="the pipeline on the embedded demo task (configs/demo/pipeline.yaml)")
    demo.add_argument("overrides", nargs="*", help="STAGE.KEY=VALUE overrides, e.g. ppo.total_steps=10")
    demo.set_defaults(func=cmd_demo)
    return parser


def serve_main(argv: list[str] | None = None) -> int:
    from reward_models.serve import main

    return main(argv)


def pipeline_main(argv: list[str] | None = None) -> int:
    from .pipeline import main

    return main(argv)


def eval_main(argv: list[str] | None = None) -> int:
    from .evaluate import main

    return main(argv)


def estimate_memory_main(argv: list[str] | None = None) -> int:
    from .memory import main

    return main(argv)


PASSTHROUGH = {"eval": eval_main, "estimate-memory": estimate_memory_main, "sft": sft_main, "reward": reward_main, "ppo": ppo_main, "serve": serve_main,
               "pipeline": pipeline_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in PASSTHROUGH:
        result = PASSTHROUGH[argv[0]](argv[1:])
        return result if isinstance(result, int) else 0
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry() -> int:
    """Console-script entry: a closed pipe (``rlhf data inspect F | head``) ends quietly."""
    try:
        return main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(entry())
