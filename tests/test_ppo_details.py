"""PPO's implementation details (docs/design.md, details 1-12) on the tiny model: each asserted where it
can be seen -- the tokens, the models a topology builds, one rollout step, the metrics of a run."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.config import PPOConfig
from rlhf.generation import encode_prompts
from rlhf.models import load_tokenizer, resolve_model_path
from rlhf.ppo.actor_critic import build_actor_critic
from rlhf.ppo.rollout import forward_response
from tests.ppo_support import OURS, PROMPTS, TRL_NAMES, make_config, trainer_for


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
    full_mask = torch.cat([mask, r_mask], 1)
    manual = torch.log_softmax(fn(torch.cat([ids, response], 1), full_mask,
                                  (full_mask.cumsum(-1) - 1).clamp(min=0))[:, ids.shape[1] - 1 : -1] / 0.7, -1)
    assert torch.allclose(manual.gather(-1, response.unsqueeze(-1)).squeeze(-1), batched, atol=1e-5)  # detail 4


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


def test_a_step_cuts_replies_at_the_configured_stop_tokens_and_penalises_missing_ones(tmp_path):
    cfg = make_config(tmp_path, "--stop_tokens", "<|end|>", "<|user|>",
                      reward_function="tests.ppo_helpers:constant_zero", missing_stop_penalty=0.7, max_new_tokens=6,
                      max_steps=1)
    trainer = trainer_for(cfg)
    metrics = trainer.step()
    ro = trainer.last_rollout
    stop_ids = {trainer.tokenizer.convert_tokens_to_ids(t) for t in cfg.stop_tokens}
    for ids, mask, has_stop, score in zip(ro.response_ids, ro.response_mask, ro.has_stop, ro.scores):
        real = ids[mask.bool()].tolist()
        assert has_stop == (real[-1] in stop_ids) and not (set(real[:-1]) & stop_ids)  # detail 6
        assert (ids[~mask.bool()] == trainer.tokenizer.pad_token_id).all()
        assert score == pytest.approx(-0.7 if not has_stop else 0.0)
    assert not ro.has_stop.all()  # a random policy rarely stops within 6 tokens: the penalty was exercised
    assert metrics["objective/scores"] == pytest.approx(-0.7 * (1 - metrics["rollout/eos_rate"]), abs=1e-6)
    assert metrics["val/ratio"] == pytest.approx(1.0, abs=0.5) and metrics["step"] == 1


def test_adaptive_kl_moves_the_coefficient_and_metrics_use_trl_names(tmp_path):
    cfg = make_config(tmp_path, "adaptive_kl=true", kl_target=0.01, kl_horizon=100, max_steps=3, kl_estimator="k3")
    history = trainer_for(cfg).train()
    coefs = [m["objective/kl_coef"] for m in history]
    # step 1: policy == reference, KL 0 < target, so the error clips at -0.2 over 8 episodes of a 100 horizon
    assert coefs[0] == pytest.approx(cfg.kl_coef * (1 - 0.2 * 8 / 100))
    assert coefs[-1] != cfg.kl_coef
    for name in TRL_NAMES + OURS:  # detail 12
        assert name in history[-1], name
    assert [m["eps"] for m in history] == [8, 16, 24] and history[-1]["lr"] == history[-1]["train/lr"]
    assert all(m["objective/kl"] >= 0 for m in history)  # k3 is non-negative


def test_batch_arithmetic_is_checked_once_at_start():
    with pytest.raises(ValueError, match="divisible"):
        PPOConfig(batch_size=10, num_minibatches=3, reward_function="gold").derive(1)
    with pytest.raises(ValueError, match="processes"):
        PPOConfig(batch_size=10, reward_function="gold").derive(4)
    with pytest.raises(ValueError, match="exactly one"):
        PPOConfig(reward_model="x", reward_function="gold").derive(1)
    sizes = PPOConfig(batch_size=64, num_minibatches=2, gradient_accumulation_steps=4, reward_function="gold").derive(2)
    assert (sizes.local_batch_size, sizes.local_minibatch_size, sizes.micro_batch_size) == (32, 16, 4)


@pytest.fixture(scope="module")
def rm_with_statistics(untrained_rm, tmp_path_factory):
    """The untrained RM with the statistics the reward stage would store (raw scores ~ N(1.9, 4.0^2))."""
    import shutil

    from reward_models.scoring import RewardScorer, pair_to_ids, save_reward_stats
    from reward_models.train import reward_statistics
    from rlhf.data import load_records
    from rlhf.data.demo_task import demo_data_paths

    out = tmp_path_factory.mktemp("rm_stats") / "rm"
    shutil.copytree(untrained_rm, out)
    scorer = RewardScorer(str(out))
    pairs, _ = load_records(demo_data_paths(0)["pairs_train"], kind="preference", max_records=200)
    rows = [dict(zip(("chosen_ids", "rejected_ids"), pair_to_ids(scorer.tokenizer, p, 256)[:2])) for p in pairs]
    mean, std = reward_statistics(scorer, rows)
    assert std > 2  # a raw scale far from the normalized scores PPO trains on
    save_reward_stats(str(out), mean, std)
    return out, std


@pytest.mark.parametrize("topology", ["separate", "shared"])
def test_a_critic_from_the_reward_model_starts_on_the_scale_of_the_returns(tmp_path, rm_with_statistics, topology,
                                                                           monkeypatch):
    rm, std = rm_with_statistics

    def first_value_loss():
        cfg = make_config(tmp_path, f"reward_model={rm}", f"topology={topology}", reward_function="null",
                          max_steps=1, ppo_epochs=1, num_minibatches=1)
        return trainer_for(cfg).step()["loss/value_avg"]

    folded = first_value_loss()  # the head is the RM's divided by its stored std (detail 11 meets detail 9)
    monkeypatch.setattr("rlhf.ppo.actor_critic._value_scale", lambda config, normalized: 1.0)
    raw = first_value_loss()  # the RM's head as it is: values on the raw scale, returns on the normalized one
    assert folded < 1.5 and folded < raw / 4, (folded, raw)


def test_greedy_evaluation_has_a_finite_kl_and_honours_the_stop_tokens(tmp_path):
    from rlhf.ppo.stage import evaluate_policy, load_prompts

    cfg = make_config(tmp_path, "--stop_tokens", "<|end|>", "<|user|>", eval_temperature=0, max_new_tokens=6)
    trainer = trainer_for(cfg)
    trainer.train()
    _, held_out, _ = load_prompts(cfg)
    figures = evaluate_policy(trainer, held_out)
    assert math.isfinite(figures["kl"]) and figures["kl"] != 0  # greedy: KL at T = 1, not NaN
    assert trainer.sampling.stop_token_ids == tuple(trainer.tokenizer.convert_tokens_to_ids(["<|end|>", "<|user|>"]))
