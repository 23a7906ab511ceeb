"""The main job (`rlhf pipeline` on the demo), its report, and the recipes' dry runs."""

import json

import pytest

from rlhf.pipeline import launch_command, load_pipeline, stage_arguments
from tests.conftest import REPO, SHARED_DATA, run_cli

RECIPES = sorted((REPO / "configs" / "recipes").glob("*/pipeline*.yaml"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def dry_run(config, *extra):
    return run_cli(["-m", "rlhf", "pipeline", "--config", str(config), "--dry-run", *extra], env=OFFLINE,
                   timeout=300)


def test_recipes_exist_for_the_hh_and_alpaca_cases():
    names = {p.parent.name for p in RECIPES}
    assert {"qwen2.5-0.5b-hh", "qwen2.5-0.5b-alpaca"} <= names
    stages = load_pipeline(str(REPO / "configs/recipes/qwen2.5-0.5b-hh/pipeline.yaml"), [])["stages"]
    assert set(stages) == {"sft", "reward", "ppo"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_passes_the_dry_run(recipe):
    result = dry_run(recipe)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dry run: 0 problem(s)" in result.stdout
    assert "(not counted: with network the run fetches it)" in result.stdout or "written by an earlier stage" in result.stdout


def test_dry_run_resolves_real_data_when_pointed_at_local_files():
    hh = SHARED_DATA / "hh-rlhf" / "helpful-online-test.jsonl.gz"
    overrides = [f"{stage}.{key}={hh}" for stage in ("sft", "reward", "ppo") for key in ("dataset", "eval_dataset")]
    result = dry_run(REPO / "configs/recipes/qwen2.5-0.5b-hh/pipeline.yaml", *overrides, "sft.max_records=200",
                     "reward.max_records=200", "ppo.max_records=200")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "format=hh kind=sft read=200" in result.stdout  # SFT on prompt + chosen
    assert "format=hh kind=preference read=200" in result.stdout
    assert "format=hh kind=prompt read=200" in result.stdout
    assert "batch sizes per process" in result.stdout


def test_dry_run_reports_every_problem(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text((REPO / "configs/demo/sft.yaml").read_text() + "\nlearning_rat: 1\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"output_dir: {tmp_path}/out\nstages:\n  sft: {{config: {bad}}}\n"
                        f"  ppo: {{config: {REPO}/configs/demo/ppo.yaml, overrides: {{batch_size: 9, "
                        f"reward_model: {tmp_path}/missing-rm}}}}\n")
    result = dry_run(pipeline)
    assert result.returncode == 1
    assert "learning_rat" in result.stdout and "divisible" in result.stdout
    assert "missing-rm: PROBLEM" in result.stdout  # no such directory, and no stage produces it
    assert "dry run: 3 problem(s)" in result.stdout
    with pytest.raises(ValueError, match="STAGE.KEY=VALUE"):
        load_pipeline(str(pipeline), ["max_steps=3"])


def test_stage_outputs_chain_and_share_one_wandb_group():
    spec = load_pipeline("demo/pipeline.yaml", ["ppo.max_steps=3"])  # a shipped pipeline, by name
    assert spec["stages"]["ppo"]["config"] == str(REPO / "configs" / "demo" / "ppo.yaml")
    args = stage_arguments(spec, "ppo", "/o", "g1")
    assert "model_name_or_path=/o/sft" in args and "reward_model=/o/reward" in args
    assert "wandb_group=g1" in args and args[-1] == "max_steps=3"  # the user's override comes last
    assert "model_name_or_path=/o/sft" in stage_arguments(spec, "reward", "/o", "g1")
    launch = launch_command(spec, "ppo", args)
    assert launch[launch.index("-m", 2):][:3] == ["-m", "rlhf", "ppo"]  # by module: no checkout needed


@pytest.mark.slow
def test_demo_pipeline_writes_the_report_and_ranks_ppo_over_sft_over_base(demo_pipeline):
    out, log = demo_pipeline
    summary = json.loads((out / "summary.json").read_text())
    base, sft, ppo = (summary["sft"]["gold/base_gold_reward"], summary["ppo"]["sft/gold_reward"],
                      summary["ppo"]["ppo/gold_reward"])
    assert ppo > sft > base, summary
    assert summary["reward"]["eval/accuracy"] >= 0.85
    assert "held-out accuracy" in log and "final KL" in log  # the printed table shows the registry's figures
    report = (out / "report.md").read_text()
    for plot in ("reward_kl", "proxy_vs_gold", "response_length", "rm_accuracy", "rm_calibration"):
        assert f"![{plot}]" in report
    for png in ("reward_kl", "proxy_vs_gold", "response_length", "rm_accuracy"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    timings = json.loads((out / "pipeline_timings.json").read_text())
    assert set(timings["seconds"]) == {"sft", "reward", "ppo"}
    runs = sorted(out.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert [r.parts[-4] for r in runs] == ["ppo", "reward", "sft"]
    assert all(timings["wandb_group"].encode() in r.read_bytes() for r in runs)  # one group for the pipeline
