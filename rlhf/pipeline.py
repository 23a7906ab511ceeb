"""``rlhf pipeline``: SFT -> reward model -> PPO, each stage its own ``accelerate launch``, then a report.

A pipeline file names the stage configs and how to launch them:

    output_dir: runs/demo
    accelerate_config: null          # or accelerate/ddp.yaml (hardware only)
    num_processes: 1                 # used when accelerate_config is null
    wandb_group: null                # default: pipeline-<time>; every stage's W&B run joins it
    stages:
      sft:    {config: sft.yaml, overrides: {}}
      reward: {config: reward.yaml}
      ppo:    {config: ppo.yaml}

Config paths are relative to the working directory, then to the pipeline file, then to the shipped
configs (``rlhf.paths.configs_root``), so a packaged pipeline runs from any directory after ``pip
install``. Outputs chain as each stage's registry entry says (the RM starts from OUTPUT/sft, PPO uses
OUTPUT/sft and OUTPUT/reward). ``--dry-run`` resolves every stage's configuration and data without training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from .paths import resolve_config
from .stages import STAGES

PIPELINE_KEYS = {"output_dir", "accelerate_config", "num_processes", "wandb_group", "stages"}
DEMO_PIPELINE = "demo/pipeline.yaml"


def load_pipeline(path: str, overrides: list[str]) -> dict:
    path = resolve_config(path)
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    unknown = set(spec) - PIPELINE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(PIPELINE_KEYS)}")
    stages = spec.get("stages") or {}
    if not set(stages) <= set(STAGES) or not stages:
        raise ValueError(f"{path}: `stages` must name some of {list(STAGES)}, got {sorted(stages)}")
    base = os.path.dirname(path)
    for stage in stages.values():
        stage["config"] = resolve_config(stage["config"], base)
        stage["overrides"] = dict(stage.get("overrides") or {})
    for item in overrides:  # stage.key=value
        key, eq, value = item.partition("=")
        stage, _, field = key.partition(".")
        if not eq or stage not in stages or not field:
            raise ValueError(f"override {item!r}: expected STAGE.KEY=VALUE with STAGE one of {sorted(stages)}")
        stages[stage]["overrides"][field] = value
    if spec.get("accelerate_config"):
        spec["accelerate_config"] = resolve_config(spec["accelerate_config"], base)
    return spec


def stage_arguments(spec: dict, name: str, out: str, group: str) -> list[str]:
    """The stage's config file, the chained outputs, the W&B group, then the user's overrides."""
    chained = {"output_dir": f"{out}/{name}", "wandb_group": group}
    chained.update({key: f"{out}/{source}" for key, source in STAGES[name].inputs.items() if source in spec["stages"]})
    chained.update(spec["stages"][name]["overrides"])
    return ["--config", spec["stages"][name]["config"], *(f"{k}={v}" for k, v in chained.items())]


def launch_command(spec: dict, name: str, args: list[str]) -> list[str]:
    """``accelerate launch [...] -m rlhf <stage> ...``: by module, so no checkout is needed."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if spec.get("accelerate_config"):
        cmd += ["--config_file", spec["accelerate_config"]]
    else:
        cmd += ["--num_processes", str(spec.get("num_processes", 1))]
        if int(spec.get("num_processes", 1)) > 1:
            cmd.append("--multi_gpu")
    return cmd + ["-m", "rlhf", name, *args]


def run_pipeline(spec: dict) -> int:
    from .report import write_report

    out = os.path.abspath(spec.get("output_dir", "runs/pipeline"))
    group = spec.get("wandb_group") or time.strftime("pipeline-%Y%m%d-%H%M%S")
    os.makedirs(out, exist_ok=True)
    timings = {}
    for name in STAGES:
        if name not in spec["stages"]:
            continue
        cmd = launch_command(spec, name, stage_arguments(spec, name, out, group))
        print(f"\n== {name}: {' '.join(cmd)}", flush=True)
        start = time.time()
        result = subprocess.run(cmd)
        timings[name] = time.time() - start
        if result.returncode:
            print(f"stage {name} failed (exit {result.returncode}); outputs so far in {out}", file=sys.stderr)
            return result.returncode
    with open(os.path.join(out, "pipeline_timings.json"), "w") as f:
        json.dump({"wandb_group": group, "seconds": timings}, f, indent=2)
    report = write_report(out, timings, group)
    print(f"\nreport: {report}")
    return 0


def dry_run(spec: dict) -> int:
    """Parse every stage's config (unknown keys fail), check derived sizes, and resolve models and data."""
    from .dry_run import check_stage

    out = os.path.abspath(spec.get("output_dir", "runs/pipeline"))
    world = int(spec.get("num_processes", 1))
    if spec.get("accelerate_config"):
        with open(spec["accelerate_config"]) as f:
            world = int((yaml.safe_load(f) or {}).get("num_processes", 1))
    produced = {os.path.join(out, name) for name in spec["stages"]}
    problems = 0
    for name in STAGES:
        if name in spec["stages"]:
            print(f"\n== {name} (dry run, {world} process(es))")
            problems += check_stage(STAGES[name], stage_arguments(spec, name, out, "dry-run"), produced, world)
    print(f"\ndry run: {problems} problem(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="rlhf pipeline", allow_abbrev=False,
                                     description="SFT -> reward model -> PPO, then a report")
    parser.add_argument("--config", required=True, help=f"pipeline YAML: a path, or a shipped one ({DEMO_PIPELINE})")
    parser.add_argument("--dry-run", action="store_true", help="resolve configs and data, train nothing")
    parser.add_argument("--output-dir", default=None, help="overrides the file's output_dir")
    parser.add_argument("overrides", nargs="*", help="STAGE.KEY=VALUE, e.g. ppo.max_steps=10")
    args = parser.parse_args(argv)
    try:
        spec = load_pipeline(args.config, args.overrides)
        if args.output_dir:
            spec["output_dir"] = args.output_dir
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return dry_run(spec) if args.dry_run else run_pipeline(spec)


def demo_main(argv: list[str] | None = None) -> int:
    """``rlhf demo [STAGE.KEY=VALUE ...]`` = ``rlhf pipeline --config demo/pipeline.yaml ...``."""
    return main(["--config", DEMO_PIPELINE, *(argv or [])])
