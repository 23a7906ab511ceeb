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
    assert "missing-rm: no such directory;" in result.stdout  # and no stage produces it
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
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert summary["evaluation"] == evaluation  # the report's policy figures are that one evaluation's
    policies = evaluation["models"]
    assert list(policies) == ["base", "SFT", "PPO"] and evaluation["n_prompts"] == 64
    assert evaluation["max_new_tokens"] == 32 and evaluation["reference"] == str(out / "sft")  # PPO's setting
    assert policies["PPO"]["gold_reward"] > policies["SFT"]["gold_reward"] > policies["base"]["gold_reward"], policies
    assert policies["SFT"]["kl"] == 0.0  # the reference itself
    rows = [json.loads(line) for line in (out / "evaluation" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and all({"prompt", "base", "SFT", "PPO"} <= set(r) for r in rows)
    assert summary["reward"]["eval/accuracy"] >= 0.85
    assert "held-out accuracy" in log and "final KL" in log  # the printed table shows the registry's figures
    assert "RM reward (normalized)" in log and "RM reward (raw)" in log and "policies on the same 64" in log
    report = (out / "report.md").read_text()
    plots = ("reward_kl", "proxy_vs_gold", "response_length", "rm_accuracy", "training_loss")
    for plot in (*plots, "rm_calibration"):
        assert f"![{plot}]" in report
    for png in plots:
        assert (out / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert "sft_log" not in summary  # loss histories stay in trainer_state.json
    history = json.loads((out / "sft" / "trainer_state.json").read_text())["log_history"]
    assert sum("loss" in entry for entry in history) >= 10  # logging_steps 10: a curve, not a point
    timings = json.loads((out / "pipeline_timings.json").read_text())
    assert set(timings["seconds"]) == {"sft", "reward", "ppo"}
    runs = sorted(out.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert [r.parts[-4] for r in runs] == ["ppo", "reward", "sft"]
    assert all(timings["wandb_group"].encode() in r.read_bytes() for r in runs)  # one group for the pipeline


def pipeline_cli(config, out, *extra, timeout=300):
    return run_cli(["-m", "rlhf", "pipeline", "--config", str(config), "--output-dir", str(out), *extra],
                   env=OFFLINE, timeout=timeout)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr


def test_pipeline_refuses_a_non_empty_output_dir_and_stages_it_cannot_chain(tmp_path):
    (tmp_path / "notes.txt").write_text("an earlier run")
    demo = REPO / "configs" / "demo" / "pipeline.yaml"
    assert_one_line_error(pipeline_cli(demo, tmp_path), "not empty", "--resume", "--overwrite")
    assert_one_line_error(pipeline_cli(demo, tmp_path, "--only", "ppo"), "['reward', 'sft']", "have not finished")
    assert_one_line_error(pipeline_cli(demo, tmp_path, "--from", "critic"), "--from critic", "['sft', 'reward', 'ppo']")
    assert_one_line_error(pipeline_cli(demo, tmp_path, "--only", "sft", "--from", "sft"), "give one of them")
    assert (tmp_path / "notes.txt").read_text() == "an earlier run" and len(list(tmp_path.iterdir())) == 1


def test_only_then_resume_runs_each_stage_once_on_the_earlier_outputs(tmp_path):
    """An interrupted pipeline (here: only SFT ran) resumes at the reward model, and says what it skipped."""
    tiny = {"sft": "max_steps=2 gold_eval_prompts=4", "reward": "max_steps=2"}
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("stages:\n" + "".join(
        f"  {name}: {{config: {REPO}/configs/demo/{name}.yaml, overrides: {{"
        + ", ".join(f"{kv.split('=')[0]}: {kv.split('=')[1]}" for kv in extra.split()) + "}}\n"
        for name, extra in tiny.items()))
    out = tmp_path / "out"
    first = pipeline_cli(pipeline, out, "--only", "sft")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (out / "sft" / "sft_summary.json").exists() and not (out / "reward").exists()
    assert_one_line_error(pipeline_cli(pipeline, out), "not empty")  # a plain rerun would overwrite SFT
    sft_model = (out / "sft" / "model.safetensors").stat().st_mtime
    resumed = pipeline_cli(pipeline, out, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"== sft: skipped, finished earlier ({out}/sft/sft_summary.json)" in resumed.stdout
    assert "== reward: " in resumed.stdout and (out / "reward" / "reward_summary.json").exists()
    assert (out / "sft" / "model.safetensors").stat().st_mtime == sft_model  # SFT was not trained again
    timings = json.loads((out / "pipeline_timings.json").read_text())["seconds"]
    assert set(timings) == {"sft", "reward"}  # the first run's SFT time is kept


def test_select_stages_reads_which_stages_finished_from_their_summary_files(tmp_path):
    from rlhf.pipeline import select_stages

    spec = load_pipeline("demo/pipeline.yaml", [])
    assert select_stages(spec, str(tmp_path / "new")) == ["sft", "reward", "ppo"]
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "sft_summary.json").write_text("{}")
    assert select_stages(spec, str(tmp_path), start="reward") == ["reward", "ppo"]
    assert select_stages(spec, str(tmp_path), resume=True) == ["reward", "ppo"]
    assert select_stages(spec, str(tmp_path), overwrite=True) == ["sft", "reward", "ppo"]
    (tmp_path / "reward").mkdir()  # an interrupted reward stage: a directory, no summary
    assert select_stages(spec, str(tmp_path), resume=True) == ["reward", "ppo"]
    with pytest.raises(ValueError, match=r"\['reward'\] have not finished"):
        select_stages(spec, str(tmp_path), only="ppo")
