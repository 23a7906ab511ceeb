"""The PPO stage: the implementation details of DESIGN.md, topologies, guards, resume, distribution, the demo."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from reward_models.train import load_reward_model
from rlhf.config import PPOConfig, parse_stage_args
from rlhf.models import load_tokenizer, resolve_model_path
from rlhf.ppo.actor_critic import build_actor_critic
from rlhf.ppo.rollout import encode_prompts, forward_response
from rlhf.ppo.trainer import PPOStopError, PPOTrainer
from tests.conftest import REPO, accelerate_launch

PPO_YAML = str(REPO / "configs" / "demo" / "ppo.yaml")
PROMPTS = [
    [{"role": "user", "content": "Where is my lamp order?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Please refund the kettle."}],
    [{"role": "user", "content": "I want a refund."}, {"role": "assistant", "content": "Which item?"},
     {"role": "user", "content": "It is the chair."}],
    [{"role": "user", "content": "My phone arrived broken."}],
]
TRL_NAMES = ["objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
             "objective/entropy", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
             "val/ratio", "val/ratio_var", "val/clipfrac_avg"]
OURS = ["train/grad_norm", "objective/kl_coef", "rollout/response_length", "rollout/eos_rate", "objective/gold_reward",
        "time/generate", "time/reference", "time/reward", "time/train", "throughput/tokens_per_s", "policy/entropy_avg"]


def small(*overrides, **kw) -> list[str]:
    """Overrides for a fast run: a random tiny policy scored by the gold reward."""
    base = {"model_name_or_path": "tiny:demo", "reward_model": "null", "reward_function": "gold", "batch_size": 8,
            "max_new_tokens": 12, "ppo_epochs": 2, "num_minibatches": 2, "total_steps": 2, "eval_prompts": 8,
            "report_to": "none", "learning_rate": 1e-3, **kw}
    return [f"{k}={v}" for k, v in base.items()] + list(overrides)


def make_config(tmp_path, *overrides, **kw) -> PPOConfig:
    (cfg,) = parse_stage_args([PPOConfig], ["--config", PPO_YAML, f"output_dir={tmp_path}", *small(*overrides, **kw)])
    return cfg


@pytest.fixture(scope="module")
def untrained_rm(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_for_ppo")
    model, tokenizer = load_reward_model("tiny:demo", None, None, False)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # a recognisable head to find in the critic
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def trainer_for(cfg) -> PPOTrainer:
    tokenizer = load_tokenizer(resolve_model_path(cfg.model_name_or_path))
    from rlhf.ppo.run import load_prompts

    prompts, _, _ = load_prompts(cfg)
    return PPOTrainer(cfg, prompts, tokenizer)


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


# ---------------------------------------------------------------- details 1-4: tokens, padding, dropout, temperature

def test_prompts_are_left_padded_and_padding_does_not_change_logprobs():
    tokenizer = load_tokenizer("tiny:demo")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:demo"))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # detail 1
    ids, mask, cut = encode_prompts(tokenizer, PROMPTS, max_length=512, device="cpu")
    assert cut == 0 and (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding (detail 2)
    response = torch.tensor([[7, 8, 9, tokenizer.eos_token_id]] * len(PROMPTS))
    r_mask = torch.ones_like(response)
    fn = lambda i, m, p, keep=0: model(input_ids=i, attention_mask=m, position_ids=p, logits_to_keep=keep).logits  # noqa: E731
    batched, _, _ = forward_response(fn, ids, mask, response, r_mask, 0.7, with_values=False)
    for row in range(len(PROMPTS)):  # the same prompt alone (no padding) gives the same logprobs
        alone = mask[row].bool()
        single, _, _ = forward_response(fn, ids[row : row + 1, alone], mask[row : row + 1, alone], response[:1],
                                        r_mask[:1], 0.7, with_values=False)
        assert torch.allclose(single[0], batched[row], atol=1e-5)
    manual = torch.log_softmax(fn(torch.cat([ids, response], 1), torch.cat([mask, r_mask], 1),
                                  (torch.cat([mask, r_mask], 1).cumsum(-1) - 1).clamp(min=0))[:, ids.shape[1] - 1 : -1] / 0.7, -1)
    assert torch.allclose(manual.gather(-1, response.unsqueeze(-1)).squeeze(-1), batched, atol=1e-5)  # detail 4
    long_ids, _, cut = encode_prompts(tokenizer, [[{"role": "user", "content": "please " * 100}]], 16, "cpu")
    assert cut == 1 and long_ids.shape[1] == 16 and long_ids[0, -1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


@pytest.mark.parametrize("topology", ["separate", "lora", "shared"])
def test_topologies_turn_dropout_off_and_start_the_critic_from_the_reward_model(tmp_path, untrained_rm, topology):
    cfg = make_config(tmp_path, f"topology={topology}", f"reward_model={untrained_rm}", reward_function="null")
    tokenizer = load_tokenizer("tiny:demo")
    model, ref = build_actor_critic(cfg, tokenizer)
    modules = list(model.modules()) + (list(ref.modules()) if ref is not None else [])
    assert all(m.p == 0 for m in modules if isinstance(m, torch.nn.Dropout))  # detail 3
    rm = AutoModelForSequenceClassification.from_pretrained(untrained_rm)
    head = model.critic.score if topology == "separate" else model.value_head
    assert torch.equal(head.weight, rm.score.weight)  # detail 11
    if topology == "separate":
        critic_state, rm_state = model.critic.state_dict(), rm.state_dict()
        assert all(torch.equal(critic_state[k], rm_state[k]) for k in rm_state)
    assert (ref is None) == (topology == "lora")  # LoRA: the reference is the base with adapters off
    ids, mask, _ = encode_prompts(tokenizer, PROMPTS, 64, "cpu")
    logits, values = model(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
    assert logits.shape[:2] == values.shape == ids.shape


# ---------------------------------------------------------------- details 5-8: ratio check, stop tokens, rewards

def test_first_minibatch_ratio_is_one_and_a_mismatch_stops_with_the_likely_cause(tmp_path):
    cfg = make_config(tmp_path, temperature=0.7)
    trainer = trainer_for(cfg)
    ro, _ = trainer.rollout(trainer.step_prompts(0))
    adv, returns, _ = trainer.advantages(ro)
    stats = trainer.train_on(ro, adv, returns)  # passes the check at 1e-3
    assert abs(stats["val/ratio"] - 1) < 0.5
    trainer.cfg.temperature = 1.0  # training now scores with a different temperature than sampling used
    ro, _ = trainer.rollout(trainer.step_prompts(1))
    ro.logprobs = ro.logprobs * 0.7  # what logprobs at the wrong temperature look like
    adv, returns, _ = trainer.advantages(ro)
    with pytest.raises(PPOStopError, match="ratio check failed.*temperature"):
        trainer.train_on(ro, adv, returns)


def test_responses_stop_at_the_configured_token_and_missing_stops_are_penalised(tmp_path):
    cfg = make_config(tmp_path, reward_function="tests.ppo_helpers:constant_zero", missing_stop_penalty=0.7,
                      max_new_tokens=6)
    cfg.stop_tokens = ["<|end|>", "<|user|>"]
    trainer = trainer_for(cfg)
    ro, _ = trainer.rollout(trainer.step_prompts(0))
    stop_ids = {trainer.tokenizer.convert_tokens_to_ids(t) for t in cfg.stop_tokens}
    for ids, mask, has_stop, score in zip(ro.response_ids, ro.response_mask, ro.has_stop, ro.scores):
        real = ids[mask.bool()].tolist()
        assert has_stop == (real[-1] in stop_ids) and not (set(real[:-1]) & stop_ids)
        assert (ids[~mask.bool()] == trainer.tokenizer.pad_token_id).all()
        assert score == pytest.approx(-0.7 if not has_stop else 0.0)
    assert not ro.has_stop.all()  # a random policy rarely stops within 6 tokens: the penalty was exercised
    adv, returns, _ = trainer.advantages(ro)
    padding = ro.response_mask == 0
    assert (adv[padding] == 0).all() and (returns[padding] == 0).all()  # detail 8


def test_adaptive_kl_moves_the_coefficient_and_metrics_use_trl_names(tmp_path):
    cfg = make_config(tmp_path, "adaptive_kl=true", kl_target=0.01, kl_horizon=100, total_steps=3, kl_estimator="k3")
    history = trainer_for(cfg).train()
    coefs = [m["objective/kl_coef"] for m in history]
    # step 1: policy == reference, KL 0 < target, so the error clips at -0.2 over 8 episodes of a 100 horizon
    assert coefs[0] == pytest.approx(cfg.kl_coef * (1 - 0.2 * 8 / 100))
    assert coefs[-1] != cfg.kl_coef
    for name in TRL_NAMES + OURS:
        assert name in history[-1], name
    assert all(m["objective/kl"] >= 0 for m in history)  # k3 is non-negative


def test_defaults_follow_the_design():
    cfg = PPOConfig()
    assert (cfg.gamma, cfg.lam, cfg.vf_coef, cfg.adam_eps, cfg.max_grad_norm) == (1.0, 0.95, 0.1, 1e-5, 1.0)
    assert cfg.kl_estimator == "k1" and cfg.reward_normalization and not cfg.whiten_rewards
    with pytest.raises(ValueError, match="divisible"):
        PPOConfig(batch_size=10, num_minibatches=3, reward_function="gold").derive(1)
    with pytest.raises(ValueError, match="exactly one"):
        PPOConfig(reward_model="x", reward_function="gold").derive(1)


# ---------------------------------------------------------------- guards, resume, distribution

def test_non_finite_reward_stops_and_leaves_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    result = accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={out}",
                               *small(reward_function="tests.ppo_helpers:nan_after_calls", total_steps=4, save_every=1,
                                      eval_prompts=4),
                               env={"NAN_AFTER": str(4 + 2 * 8), "PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    assert "non-finite scores in the rollout of step 3" in result.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step-2"
    assert not list((out / "checkpoints").glob("*.tmp"))


def _last_metrics(out):
    return json.loads((out / "metrics.jsonl").read_text().strip().splitlines()[-1])


@pytest.mark.slow
def test_sigkill_and_resume_end_where_an_uninterrupted_run_ends(tmp_path):
    args = small(total_steps=6, save_every=2, eval_prompts=4)
    straight = tmp_path / "straight"
    _ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={straight}", *args))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(REPO / "scripts" / "ppo.py"),
           "--config", PPO_YAML, f"output_dir={killed}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher tree, mid-training
    proc.wait()
    assert (killed / "checkpoints" / "latest").exists() and not (killed / "ppo_summary.json").exists()
    log = _ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={killed}", *args, "resume=true"))
    assert "resumed from" in log
    a, b = _last_metrics(straight), _last_metrics(killed)
    assert a["step"] == b["step"] == 6
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "objective/gold_reward",
                "train/grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    # top_k=1 makes sampling independent of how prompts are split over processes
    args = small("top_k=1", total_steps=1, batch_size=8, num_minibatches=1, eval_prompts=4)
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={one}", *args))
    log = _ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={two}", *args, num_processes=2))
    assert log.count("resolved config:") == 1
    a, b = _last_metrics(one), _last_metrics(two)
    for key in ("objective/scores", "objective/gold_reward", "rollout/response_length", "rollout/eos_rate",
                "objective/entropy", "val/num_eos_tokens"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert b["loss/value_avg"] == pytest.approx(a["loss/value_avg"], rel=0.05)


# ---------------------------------------------------------------- topologies end to end, PPO-ptx, the demo

@pytest.mark.slow
@pytest.mark.parametrize("topology", ["lora", "shared"])
def test_topology_runs_and_saves_standard_outputs(tmp_path, untrained_rm, topology):
    out = tmp_path / topology
    _ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={out}",
                          *small(f"topology={topology}", f"critic_model={untrained_rm}", "ptx_coef=0.5",
                                 "ptx_batch_size=4")))
    policy = AutoModelForCausalLM.from_pretrained(out)  # LoRA: transformers loads base + adapter
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    assert policy.config.vocab_size == critic.config.vocab_size
    if topology == "lora":
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    metrics = _last_metrics(out)
    assert metrics["loss/ptx_avg"] > 0


@pytest.mark.slow
def test_demo_ppo_beats_the_sft_policy_on_gold_reward(demo_pipeline):
    root, log = demo_pipeline
    out = root / "ppo"
    summary = json.loads((out / "ppo_summary.json").read_text())
    assert summary["ppo/gold_reward"] > summary["sft/gold_reward"] + 0.4, summary
    assert summary["ppo/reward"] > summary["sft/reward"]
    assert summary["ppo/eos_rate"] >= 0.9 and 0 < summary["ppo/kl"] < 10
    assert "held-out" in log and "gold_reward" in log
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    assert AutoModelForSequenceClassification.from_pretrained(out / "critic").config.num_labels == 1
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 24 and all(name in steps[-1] for name in TRL_NAMES + OURS)


def test_remote_reward_through_the_api_matches_the_local_reward_model(reward_server, tiny_reward_model, tmp_path):
    from reward_models.client import RemoteRewardFunction, RewardClient
    from rlhf.ppo.rewards import LocalRewardModel

    responses = ["I have issued a full refund for your kettle.", "", "好的 🙂"] + ["x"] * (len(PROMPTS) - 3)
    remote = RemoteRewardFunction(RewardClient(reward_server.url), normalized=True, truncate=True)
    local = LocalRewardModel(tiny_reward_model, device="cpu")
    assert remote(PROMPTS, responses) == pytest.approx(local(PROMPTS, responses), abs=1e-5)
    out = tmp_path / "remote"
    _ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={out}",
                          *small(f"reward_url={reward_server.url}", reward_function="null", total_steps=1)))
    scores = _last_metrics(out)["objective/raw_scores"]
    assert scores != 0 and scores == scores  # the API's (normalised) scores drove the step
    assert "POST /v1/score" in reward_server.logs() or "/v1/score" in reward_server.logs()
