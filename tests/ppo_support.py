"""What the PPO tests share: a fast config, the demo config's path, and reading a run's outputs."""

import json

from rlhf.config import PPOConfig, parse_stage_args
from tests.conftest import REPO

PPO_YAML = str(REPO / "configs" / "demo" / "ppo.yaml")
PROMPTS = [
    [{"role": "user", "content": "Where is my lamp order?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Please refund the kettle."}],
    [{"role": "user", "content": "I want a refund."}, {"role": "assistant", "content": "Which item?"},
     {"role": "user", "content": "It is the chair."}],
    [{"role": "user", "content": "My phone arrived broken."}],
]
# metric names TRL 1.12's PPOTrainer logged, and ours
TRL_NAMES = ["objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
             "objective/entropy", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
             "val/ratio", "val/ratio_var", "val/clipfrac_avg", "lr", "eps"]
OURS = ["train/grad_norm", "objective/kl_coef", "rollout/response_length", "rollout/eos_rate", "objective/gold_reward",
        "time/generate", "time/reference", "time/reward", "time/train", "throughput/tokens_per_s", "policy/entropy_avg"]


def small(*overrides, **kw) -> list[str]:
    """Overrides for a fast run: a random tiny policy scored by the gold reward."""
    base = {"model_name_or_path": "tiny:demo", "reward_model": "null", "reward_function": "gold", "batch_size": 8,
            "max_new_tokens": 12, "ppo_epochs": 2, "num_minibatches": 2, "max_steps": 2, "eval_prompts": 8,
            "report_to": "none", "learning_rate": 1e-3, **kw}
    return [f"{k}={v}" for k, v in base.items()] + list(overrides)


def make_config(tmp_path, *overrides, **kw) -> PPOConfig:
    (cfg,) = parse_stage_args([PPOConfig], ["--config", PPO_YAML, f"output_dir={tmp_path}", *small(*overrides, **kw)])
    return cfg


def trainer_for(cfg):
    from rlhf.models import load_tokenizer, resolve_model_path
    from rlhf.ppo.stage import load_prompts
    from rlhf.ppo.trainer import PPOTrainer

    prompts, _, _ = load_prompts(cfg)
    return PPOTrainer(cfg, prompts, load_tokenizer(resolve_model_path(cfg.model_name_or_path)))


def ok(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def metrics_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
