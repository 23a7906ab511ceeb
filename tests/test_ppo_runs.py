"""PPO runs end to end, as users launch them: resume after SIGKILL, 2 processes, every topology, the
scoring API as the reward, deprecated keys, and the demo's result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.conftest import REPO, accelerate_launch
from tests.ppo_support import OURS, PPO_YAML, PROMPTS, TRL_NAMES, metrics_of, ok, small


@pytest.mark.slow
def test_sigkill_and_resume_end_where_an_uninterrupted_run_ends(tmp_path):
    args = small(max_steps=6, save_steps=2, eval_prompts=4)
    straight = tmp_path / "straight"
    ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={straight}", *args))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "-m", "rlhf", "ppo",
           "--config", PPO_YAML, f"output_dir={killed}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher tree, mid-training
    proc.wait()
    assert (killed / "checkpoints" / "latest").exists() and not (killed / "ppo_summary.json").exists()
    log = ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={killed}", *args, "resume=true"))
    assert "resumed from" in log
    a, b = metrics_of(straight)[-1], metrics_of(killed)[-1]
    assert a["step"] == b["step"] == 6
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "objective/gold_reward",
                "train/grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert [m["step"] for m in metrics_of(killed)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    # top_k=1 makes sampling independent of how prompts are split over processes
    args = small("top_k=1", max_steps=1, batch_size=8, num_minibatches=1, eval_prompts=4)
    one, two = tmp_path / "one", tmp_path / "two"
    ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={one}", *args))
    log = ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={two}", *args, num_processes=2))
    assert log.count("resolved config (saved as") == 1  # printed (and saved) by the main process only
    assert "per process: PPODerived(local_batch_size=4" in log  # really two processes of 4 prompts
    a, b = metrics_of(one)[-1], metrics_of(two)[-1]
    for key in ("objective/scores", "objective/gold_reward", "rollout/response_length", "rollout/eos_rate",
                "objective/entropy", "val/num_eos_tokens"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert b["loss/value_avg"] == pytest.approx(a["loss/value_avg"], rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["lora", "shared"])
def test_topology_runs_and_saves_standard_outputs(tmp_path, untrained_rm, topology):
    out = tmp_path / topology
    ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={out}",
                         *small(f"topology={topology}", f"critic_model={untrained_rm}", "ptx_coef=0.5",
                                "ptx_batch_size=4")))
    policy = AutoModelForCausalLM.from_pretrained(out)  # LoRA: transformers loads base + adapter
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    assert policy.config.vocab_size == critic.config.vocab_size
    if topology == "lora":
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert metrics_of(out)[-1]["loss/ptx_avg"] > 0


def test_deprecated_keys_still_work_and_name_their_replacement(tmp_path):
    out = tmp_path / "old-keys"
    args = [a for a in small(eval_prompts=4) if not a.startswith("max_steps=")]
    log = ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={out}", *args, "total_steps=1",
                               "save_every=1", "sample_every=1"))
    for old, new in (("total_steps", "max_steps"), ("save_every", "save_steps"), ("sample_every", "num_sample_generations")):
        assert f"`{old}` is deprecated" in log and f"use `{new}`" in log
    assert [m["step"] for m in metrics_of(out)] == [1] and (out / "checkpoints" / "step-1").is_dir()


@pytest.mark.slow
def test_demo_ppo_beats_the_sft_policy_on_gold_reward(demo_pipeline):
    root, _ = demo_pipeline
    out = root / "ppo"
    summary = json.loads((out / "ppo_summary.json").read_text())
    assert summary["ppo/gold_reward"] > summary["sft/gold_reward"] + 0.4, summary
    assert summary["ppo/reward"] > summary["sft/reward"]
    assert summary["ppo/eos_rate"] >= 0.9 and 0 < summary["ppo/kl"] < 10
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    assert AutoModelForSequenceClassification.from_pretrained(out / "critic").config.num_labels == 1
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))
    steps = metrics_of(out)
    assert len(steps) == 24 and all(name in steps[-1] for name in TRL_NAMES + OURS)


def test_remote_reward_through_the_api_matches_the_local_reward_model(reward_server, tiny_reward_model, tmp_path):
    from reward_models.client import RemoteRewardFunction, RewardClient
    from rlhf.ppo.rewards import LocalRewardModel

    responses = ["I have issued a full refund for your kettle.", "", "好的 🙂"] + ["x"] * (len(PROMPTS) - 3)
    remote = RemoteRewardFunction(RewardClient(reward_server.url), normalized=True, truncate=True)
    local = LocalRewardModel(tiny_reward_model, device="cpu")
    assert remote(PROMPTS, responses) == pytest.approx(local(PROMPTS, responses), abs=1e-5)
    out = tmp_path / "remote"
    ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={out}",
                         *small(f"reward_url={reward_server.url}", reward_function="null", max_steps=1)))
    scores = metrics_of(out)[-1]["objective/raw_scores"]
    assert scores != 0 and scores == scores  # the API's (normalized) scores drove the step
    assert "/v1/score" in reward_server.logs()
