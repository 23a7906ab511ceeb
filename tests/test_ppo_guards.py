"""The guards stop a run before a bad update, with the cause named and the last checkpoint intact; each is
driven through a real run from a config, as a user meets it."""

import json

import pytest
import torch

from rlhf.ppo.trainer import PPOStopError
from tests.conftest import REPO, accelerate_launch
from tests.ppo_support import PPO_YAML, make_config, small, trainer_for

# A checkpoint with its own modelling code whose training-mode forward is noisy: what an unknown dropout-like
# module (which disable_dropout cannot see) or a non-deterministic kernel does to PPO's ratio
NOISY_MODELLING = '''
import torch
from transformers import LlamaForCausalLM


class NoisyLlamaForCausalLM(LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.training:
            out.logits = out.logits + 0.5 * torch.randn_like(out.logits)
        return out
'''


@pytest.fixture(scope="module")
def noisy_policy(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models import resolve_model_path

    base, out = resolve_model_path("tiny:demo"), tmp_path_factory.mktemp("noisy")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.config.auto_map = {"AutoModelForCausalLM": "modeling_noisy.NoisyLlamaForCausalLM"}
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "modeling_noisy.py").write_text(NOISY_MODELLING)
    return out


def test_a_policy_whose_training_forward_differs_fails_the_first_ratio_check(tmp_path, noisy_policy, untrained_rm):
    cfg = make_config(tmp_path, "trust_remote_code=true", f"model_name_or_path={noisy_policy}",
                      f"critic_model={untrained_rm}", temperature=0.7)
    trainer = trainer_for(cfg)
    assert type(trainer.accelerator.unwrap_model(trainer.model).policy).__name__ == "NoisyLlamaForCausalLM"
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(PPOStopError, match=r"ratio check failed at step 1.*before any update.*dropout"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # nothing was updated


def test_the_same_run_on_the_plain_checkpoint_passes_the_check_at_1e_6(tmp_path):
    # the rollout and training forwards see identical inputs, so fp32 logprobs agree exactly
    history = trainer_for(make_config(tmp_path, temperature=0.7, ratio_check_tolerance=1e-6, max_steps=2)).train()
    assert [m["step"] for m in history] == [1, 2]  # the check ran before both updates and passed


def test_non_finite_reward_stops_and_leaves_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    result = accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={out}",
                               *small(reward_function="tests.ppo_helpers:nan_after_calls", max_steps=4, save_steps=1,
                                      eval_prompts=4),
                               env={"NAN_AFTER": str(4 + 2 * 8), "PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    assert "step 3: reward source 'nan_after_calls' returned a non-finite value (nan)" in result.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step-2"
    assert not list((out / "checkpoints").glob("*.tmp"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the failed step logged nothing
