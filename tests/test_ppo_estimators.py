"""The critic-free estimators and composed rewards, as users run them: GRPO and RLOO on the demo task, a
reward model plus a rule, a dataset column reaching a verifier, a failing source named."""

import json

import pytest

from rlhf.ppo.actor_critic import PolicyOnly
from rlhf.ppo.trainer import PPOStopError
from tests.conftest import REPO, accelerate_launch
from tests.ppo_support import make_config, metrics_of, ok, trainer_for

CONFIGS = REPO / "configs" / "demo"


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_demo_runs_raise_the_gold_reward_over_sft(demo_pipeline, estimator, tmp_path):
    root, _ = demo_pipeline
    out = tmp_path / estimator
    ok(accelerate_launch("ppo.py", "--config", str(CONFIGS / f"{estimator}.yaml"), f"output_dir={out}",
                         f"model_name_or_path={root / 'sft'}", f"reward_model={root / 'reward'}", "report_to=none"))
    summary = json.loads((out / "ppo_summary.json").read_text())
    assert summary["ppo/gold_reward"] > summary["sft/gold_reward"] + 0.4, summary  # PPO's bar
    assert summary["ppo/eos_rate"] >= 0.9 and 0 < summary["ppo/kl"] < 5
    assert not (out / "critic").exists()  # no critic was built, so none is saved
    last = metrics_of(out)[-1]
    assert "loss/value_avg" not in last and "val/clipfrac_avg" not in last


def test_no_critic_is_built_and_the_groups_are_the_prompts(tmp_path):
    cfg = make_config(tmp_path, "advantage_estimator=grpo", "samples_per_prompt=4", batch_size=4, max_steps=1,
                      num_minibatches=2)
    trainer = trainer_for(cfg)
    assert isinstance(trainer.accelerator.unwrap_model(trainer.model), PolicyOnly)
    assert len(trainer.optimizer.param_groups) == 1  # the policy's alone
    trainer.step()
    ro = trainer.last_rollout
    assert ro.groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert all(ro.prompts[i] == ro.prompts[i - i % 4] for i in range(16))
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        make_config(tmp_path, "advantage_estimator=rloo").derive(1)
    with pytest.raises(ValueError, match="8 prompts x 3 samples = 24 sequences must be divisible"):
        make_config(tmp_path, "samples_per_prompt=3", num_minibatches=5).derive(1)


def test_a_reward_model_plus_a_rule_logs_both_sources_and_their_weighted_sum(tmp_path, tiny_reward_model):
    rewards = [{"model": str(tiny_reward_model), "name": "rm"},  # stored statistics: mean 0.5, std 2
               {"function": "tests.ppo_helpers:length_rewards", "weight": 0.5, "name": "length"}]
    yaml = tmp_path / "two.yaml"
    yaml.write_text((CONFIGS / "ppo.yaml").read_text().replace("reward_model: runs/demo/reward", "")
                    + f"rewards: {json.dumps(rewards)}\n")
    out = tmp_path / "run"
    ok(accelerate_launch("ppo.py", "--config", str(yaml), f"output_dir={out}", "model_name_or_path=tiny:demo",
                         "batch_size=8", "max_new_tokens=8", "ppo_epochs=1", "max_steps=2", "eval_prompts=4",
                         "report_to=none", env={"PYTHONPATH": str(REPO)}))
    for m in metrics_of(out):
        assert m["objective/raw_scores"] == pytest.approx(m["reward/rm"] + 0.5 * m["reward/length"], rel=1e-5)
        assert m["reward/length_raw"] == m["reward/length"]  # a rule has no normalization
        assert m["reward/rm"] == pytest.approx((m["reward/rm_raw"] - 0.5) / 2.0, rel=1e-5)  # normalized by its stats


def test_dataset_columns_reach_the_reward_function(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say the number {i}.", "answer": str(i % 3)}) + "\n"
                               for i in range(12)))
    rewards = json.dumps({"function": "tests.ppo_helpers:answer_match"})
    cfg = make_config(tmp_path, f"dataset={prompts}", "--rewards", rewards, reward_function="null", max_steps=1,
                      eval_prompts=4)
    trainer = trainer_for(cfg)
    trainer.step()
    assert [c["answer"] for c in trainer.last_rollout.columns] == [
        r["columns"]["answer"] for r in trainer.step_prompts(0)]  # the columns rode along with the prompts


def test_a_failing_source_stops_the_step_naming_it(tmp_path):
    rewards = [json.dumps({"function": "gold"}), json.dumps({"function": "tests.ppo_helpers:always_fails",
                                                             "name": "verifier"})]
    cfg = make_config(tmp_path, "--rewards", *rewards, reward_function="null", max_steps=1)
    with pytest.raises(PPOStopError, match=r"step 1: reward source 'verifier' failed: ConnectionError: the verifier"):
        trainer_for(cfg).train()
