"""Sharded training on 2 CPU processes over gloo, with the shipped accelerate configs: DeepSpeed ZeRO-2 and
ZeRO-3 for all three stages, FSDP2 (torch's fully_shard) for PPO, each against DDP at the same seed and
global batch. Every broken set-up seen while building this exited 0 with each rank training alone, so each
test also checks that two processes really shared the work and that the parameters really are sharded."""

import json

import pytest

from tests.conftest import REPO, run_cli
from tests.ppo_support import metrics_of, ok, small

CONFIGS = REPO / "configs"
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def launch(config: str, *args: str, env: dict | None = None, precision: str = "no"):
    """``accelerate launch --config_file configs/accelerate/<config>.yaml --num_processes 2 -m rlhf ...``."""
    return run_cli(["-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate" / f"{config}.yaml"),
                    "--num_processes", "2", "--mixed_precision", precision, "-m", "rlhf", *args],
                   env={"PYTHONPATH": str(REPO), **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel_ppo")
    args = small("top_k=1", reward_function="tests.ppo_helpers:length_reward", batch_size=8, max_new_tokens=10,
                 ppo_epochs=1, num_minibatches=1, eval_prompts=4)
    runs = {}
    for config in ("cpu", "zero2", "zero3", "fsdp2"):
        out = root / config
        ok(launch(config, "ppo", "--config", "demo/ppo.yaml", f"output_dir={out}", *args))
        runs[config] = (json.loads((out / "ppo_summary.json").read_text()), metrics_of(out))
    return runs


@pytest.mark.parametrize("config", ["zero2", "zero3", "fsdp2"])
def test_ppo_under_each_sharding_matches_ddp(ppo_runs, config):
    summary, metrics = ppo_runs[config]
    reference = ppo_runs["cpu"][1]
    parallel = summary["parallelism"]
    assert parallel["num_processes"] == 2
    for a, b in zip(metrics, reference):
        for key in ("objective/scores", "objective/kl", "loss/value_avg", "train/grad_norm", "rollout/response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (config, key)
    if config == "zero3":  # parameters partitioned: this process holds none of them whole
        assert parallel["zero3_parameters"] > 0 and parallel["local_elements"] < parallel["full_elements"] / 2 + 1
    if config == "fsdp2":  # DTensor shards of about half each
        assert parallel["fsdp2_parameters"] > 0 and parallel["local_elements"] <= parallel["full_elements"] / 2 + 1000


def test_ppo_saves_whole_models_under_zero3_and_fsdp2(ppo_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    sizes = {}
    for config in ("cpu", "zero3", "fsdp2"):
        out = tmp_path.parent / "parallel_ppo0" / config
        model = AutoModelForCausalLM.from_pretrained(out)
        sizes[config] = sum(p.numel() for p in model.parameters())
        assert (out / "critic" / "config.json").exists()
    assert sizes["zero3"] == sizes["fsdp2"] == sizes["cpu"]


def test_zero3_bf16_ppo_keeps_the_ratio_check(tmp_path):
    out = tmp_path / "bf16"
    ok(launch("zero3", "ppo", "--config", "demo/ppo.yaml", f"output_dir={out}",
              *small(batch_size=8, max_new_tokens=8, ppo_epochs=1, eval_prompts=4), precision="bf16"))
    assert [m["step"] for m in metrics_of(out)] == [1, 2]  # each step passed the first-minibatch ratio check


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_trl_stages_under_zero2_and_zero3_match_ddp(stage, tmp_path):
    args = ["--config", f"demo/{stage}.yaml", "report_to=none", "max_records=64", "num_train_epochs=1",
            "eval_strategy=no"]
    args += ["model_name_or_path=tiny:demo"] if stage == "reward" else ["num_sample_generations=0", "gold_eval_prompts=0"]
    losses = {}
    for config in ("cpu", "zero2", "zero3"):
        out = tmp_path / config
        ok(launch(config, stage, *args, f"output_dir={out}"))
        summary = json.loads((out / f"{stage}_summary.json").read_text())
        losses[config] = summary["train_loss"]
        assert summary["num_processes"] == 2 and summary["zero_stage"] == {"cpu": 0, "zero2": 2, "zero3": 3}[config]
    assert losses["zero2"] == pytest.approx(losses["cpu"], rel=1e-4)
    assert losses["zero3"] == pytest.approx(losses["cpu"], rel=1e-4)


def test_trl_stages_refuse_fsdp2_on_cpu_saying_why(tmp_path):
    result = launch("fsdp2", "sft", "--config", "demo/sft.yaml", f"output_dir={tmp_path}", "report_to=none")
    assert result.returncode != 0
    assert "FSDP2 for the SFT and reward stages needs GPUs" in result.stderr
