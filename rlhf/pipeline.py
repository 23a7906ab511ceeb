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
    evaluation: {}                   # optional: prompts, max_prompts, max_new_tokens, temperature, seed

After the stages, ``rlhf.pipeline_eval`` samples base, SFT and PPO policies with one setting; the
report's policy table shows only those numbers.

Config paths are relative to the working directory, then to the pipeline file, then to the shipped
configs (``rlhf.paths.configs_root``), so a packaged pipeline runs from any directory after ``pip
install``. Outputs chain as each stage's registry entry says (the RM starts from OUTPUT/sft, PPO uses
OUTPUT/sft and OUTPUT/reward). ``--dry-run`` resolves every stage's configuration and data without training.

Which stages run: all of them into an empty (or new) output directory. A directory that holds files is
refused unless ``--resume`` (stages whose summary file exists are skipped: an interrupted pipeline picks up
at the stage it was in) or ``--overwrite`` (every stage runs again). ``--only STAGE`` and ``--from STAGE``
run one stage, or that stage and the ones after it, on the earlier stages' outputs already in the directory.
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

PIPELINE_KEYS = {"output_dir", "accelerate_config", "num_processes", "wandb_group", "stages", "evaluation"}
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
    from .pipeline_eval import EVALUATION_KEYS

    unknown = set(spec.get("evaluation") or {}) - EVALUATION_KEYS
    if unknown:
        raise ValueError(f"{path}: evaluation: unknown keys {sorted(unknown)}; allowed: {sorted(EVALUATION_KEYS)}")
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
    else:  # every value accelerate would otherwise default, warning about each one at every stage
        cmd += ["--num_processes", str(spec.get("num_processes", 1)), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
        if int(spec.get("num_processes", 1)) > 1:
            cmd.append("--multi_gpu")
    return cmd + ["-m", "rlhf", name, *args]


def summary_path(out: str, name: str) -> str:
    """The file a stage writes last: its presence means the stage finished."""
    return os.path.join(out, name, STAGES[name].summary_file)


def select_stages(spec: dict, out: str, only: str | None = None, start: str | None = None,
                  resume: bool = False, overwrite: bool = False) -> list[str]:
    """The stages to run, in order; ValueError (one line) when the choice does not fit the output directory."""
    names = [name for name in STAGES if name in spec["stages"]]
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names:
            raise ValueError(f"{flag} {value}: this pipeline's stages are {names}")
    if only or start:
        chosen = [only] if only else names[names.index(start):]
        needed = {source for name in chosen for source in STAGES[name].inputs.values()
                  if source in names and source not in chosen}
        missing = [name for name in sorted(needed) if not os.path.exists(summary_path(out, name))]
        if missing:
            raise ValueError(f"{out}: stage(s) {missing} have not finished there (no {STAGES[missing[0]].summary_file}); "
                             f"run them first, or drop --only/--from")
        return chosen
    if resume:
        return [name for name in names if not os.path.exists(summary_path(out, name))]
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"output directory {out} is not empty: pass --resume to skip its finished stages, "
                         "--overwrite to run every stage again, or another --output-dir")
    return names


def run_pipeline(spec: dict, stages: list[str] | None = None) -> int:
    from .report import write_report

    out = os.path.abspath(spec.get("output_dir", "runs/pipeline"))
    group = spec.get("wandb_group") or time.strftime("pipeline-%Y%m%d-%H%M%S")
    stages = [name for name in STAGES if name in spec["stages"]] if stages is None else stages
    os.makedirs(out, exist_ok=True)
    timings = _read_json(os.path.join(out, "pipeline_timings.json")).get("seconds", {})
    for name in stages:  # a rerun's report must not mix an old summary with the new stages' outputs
        if os.path.exists(summary_path(out, name)):
            os.remove(summary_path(out, name))
    for name in STAGES:
        if name not in spec["stages"]:
            continue
        if name not in stages:
            print(f"\n== {name}: skipped, finished earlier ({summary_path(out, name)})", flush=True)
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
    from . import pipeline_eval

    if stages or not os.path.exists(os.path.join(out, pipeline_eval.RESULT)):  # a rerun re-evaluates
        pipeline_eval.run(spec, out)
    report = write_report(out, timings, group)
    print(f"\nreport: {report}")
    return 0


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


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
    order = "|".join(STAGES)
    parser.add_argument("--only", metavar=order, default=None, help="run this stage alone, on the earlier "
                        "stages' outputs already in the output directory")
    parser.add_argument("--from", dest="start", metavar=order, default=None,
                        help="run this stage and the ones after it")
    parser.add_argument("--resume", action="store_true", help="skip the stages that finished (their summary "
                        "file exists): continue an interrupted pipeline")
    parser.add_argument("--overwrite", action="store_true", help="run every stage into a non-empty output directory")
    parser.add_argument("overrides", nargs="*", help="STAGE.KEY=VALUE, e.g. ppo.max_steps=10")
    args = parser.parse_args(argv)
    try:
        spec = load_pipeline(args.config, args.overrides)
        if args.output_dir:
            spec["output_dir"] = args.output_dir
        if args.only and args.start:
            raise ValueError("--only and --from: give one of them")
        if args.dry_run:
            return dry_run(spec)
        stages = select_stages(spec, os.path.abspath(spec.get("output_dir", "runs/pipeline")), args.only,
                               args.start, args.resume, args.overwrite)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_pipeline(spec, stages)


def demo_main(argv: list[str] | None = None) -> int:
    """``rlhf demo [STAGE.KEY=VALUE ...]`` = ``rlhf pipeline --config demo/pipeline.yaml ...``."""
    return main(["--config", DEMO_PIPELINE, *(argv or [])])
