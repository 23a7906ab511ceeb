"""Unit tests for the pure PPO math (rlhf/ppo/math.py) and the KL controllers (rlhf/ppo/kl.py).

Everything is checked against plain-Python loop references or values computed by hand, with the edge
cases that break PPO implementations in practice: EOS at the last position, empty (stop-token-only)
responses, all-padding rows, and garbage at masked positions.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, make_kl_controller
from rlhf.ppo.math import (
    entropy_from_logits,
    first_true_index,
    gae,
    kl_per_token,
    last_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    policy_loss,
    shaped_rewards,
    truncate_after_stop,
    value_loss,
    whiten,
)

F64 = torch.float64


def _mask_from_lengths(lengths: list[int], T: int) -> torch.Tensor:
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths], dtype=torch.long)


def _close(actual, expected, tol: float = 1e-9) -> None:
    actual = torch.as_tensor(actual, dtype=F64)
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------- GAE


def _gae_reference(values: list[float], rewards: list[float], length: int, gamma: float, lam: float):
    """One row, plain floats: stop at the last real token; V and r are 0 after it, bootstrap 0."""
    T = len(values)
    adv = [0.0] * T
    running = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    returns = [adv[t] + values[t] if t < length else 0.0 for t in range(T)]
    return adv, returns


# lengths: EOS at the last position (full mask), a 1-token response, an all-padding row, mixed ones
GAE_LENGTHS = [7, 1, 0, 3, 6, 2]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0), (0.5, 0.7), (1.0, 1.0)])
def test_gae_matches_plain_loop_reference(gamma, lam):
    gen = torch.Generator().manual_seed(1234)
    T = 7
    values = torch.randn(len(GAE_LENGTHS), T, generator=gen, dtype=F64)
    rewards = torch.randn(len(GAE_LENGTHS), T, generator=gen, dtype=F64)
    mask = _mask_from_lengths(GAE_LENGTHS, T)

    adv, ret = gae(values, rewards, mask, gamma=gamma, lam=lam)

    assert adv.shape == ret.shape == (len(GAE_LENGTHS), T)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    for b, n in enumerate(GAE_LENGTHS):
        ref_adv, ref_ret = _gae_reference(values[b].tolist(), rewards[b].tolist(), n, gamma, lam)
        _close(adv[b], ref_adv)
        _close(ret[b], ref_ret)


def test_gae_defaults_are_gamma_1_lambda_095():
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(3, 5, generator=gen, dtype=F64)
    rewards = torch.randn(3, 5, generator=gen, dtype=F64)
    mask = _mask_from_lengths([5, 2, 0], 5)
    adv_default, ret_default = gae(values, rewards, mask)
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv_default, adv, rtol=0, atol=0)
    torch.testing.assert_close(ret_default, ret, rtol=0, atol=0)


def test_gae_padding_values_and_rewards_never_leak():
    """Garbage in V and r after the stop token changes nothing (the off-by-one of detail 8)."""
    gen = torch.Generator().manual_seed(3)
    T = 6
    lengths = [4, 1, 0, 6]
    mask = _mask_from_lengths(lengths, T)
    values = torch.randn(4, T, generator=gen, dtype=F64)
    rewards = torch.randn(4, T, generator=gen, dtype=F64)
    garbage_v = torch.where(mask.bool(), values, torch.full_like(values, 1e6))
    garbage_r = torch.where(mask.bool(), rewards, torch.full_like(rewards, -1e6))
    clean_v = values * mask
    clean_r = rewards * mask

    adv_g, ret_g = gae(garbage_v, garbage_r, mask)
    adv_c, ret_c = gae(clean_v, clean_r, mask)
    torch.testing.assert_close(adv_g, adv_c, rtol=0, atol=0)
    torch.testing.assert_close(ret_g, ret_c, rtol=0, atol=0)
    # padding positions are exactly 0
    assert (adv_g[mask == 0] == 0).all() and (ret_g[mask == 0] == 0).all()


def test_gae_all_padding_row_is_zero_and_finite():
    values = torch.tensor([[0.5, -2.0, 3.0]], dtype=F64)
    rewards = torch.tensor([[1.0, 1.0, 1.0]], dtype=F64)
    mask = torch.zeros(1, 3, dtype=torch.long)
    adv, ret = gae(values, rewards, mask)
    assert torch.equal(adv, torch.zeros_like(adv))
    assert torch.equal(ret, torch.zeros_like(ret))


def test_gae_returns_equal_advantages_plus_values_on_mask_zero_off():
    gen = torch.Generator().manual_seed(11)
    T = 8
    lengths = [8, 5, 1, 0]
    mask = _mask_from_lengths(lengths, T)
    values = torch.randn(4, T, generator=gen, dtype=F64)
    rewards = torch.randn(4, T, generator=gen, dtype=F64)
    adv, ret = gae(values, rewards, mask, gamma=0.97, lam=0.9)
    on = mask.bool()
    torch.testing.assert_close(ret[on], (adv + values)[on])
    assert (ret[~on] == 0).all() and (adv[~on] == 0).all()


def test_gae_lambda_one_gives_discounted_reward_to_go():
    """lam=1: returns are the discounted reward-to-go (within the response), advantages that minus V."""
    gamma = 0.9
    values = torch.tensor([[0.3, -0.2, 0.7, 5.0], [1.0, 2.0, 3.0, 4.0]], dtype=F64)
    rewards = torch.tensor([[1.0, 0.0, 2.0, 9.0], [0.5, -1.0, 0.25, 3.0]], dtype=F64)
    mask = _mask_from_lengths([3, 4], 4)
    adv, ret = gae(values, rewards, mask, gamma=gamma, lam=1.0)
    # row 0: real tokens 0..2; the 9.0 reward / 5.0 value after the stop are ignored
    rtg0 = [1.0 + gamma * 0.0 + gamma**2 * 2.0, 0.0 + gamma * 2.0, 2.0, 0.0]
    rtg1 = [
        0.5 + gamma * -1.0 + gamma**2 * 0.25 + gamma**3 * 3.0,
        -1.0 + gamma * 0.25 + gamma**2 * 3.0,
        0.25 + gamma * 3.0,
        3.0,
    ]
    _close(ret, [rtg0, rtg1])
    expected_adv = torch.tensor([rtg0, rtg1], dtype=F64) - values * mask
    _close(adv, expected_adv)


def test_gae_lambda_zero_is_one_step_td():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)
    rewards = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=F64)
    mask = _mask_from_lengths([3], 4)
    adv, _ = gae(values, rewards, mask, gamma=0.5, lam=0.0)
    # delta_t = r_t + 0.5 V_{t+1} - V_t, bootstrap 0 after the last real token (t=2)
    _close(adv, [[0.5 + 1.0 - 1.0, 0.5 + 1.5 - 2.0, 0.5 + 0.0 - 3.0, 0.0]])


def test_gae_hand_computed_eos_at_last_position():
    """Full mask (EOS at T-1): the terminal bootstrap is 0, not some value past the end."""
    values = torch.tensor([[0.5, 1.0]], dtype=F64)
    rewards = torch.tensor([[0.0, 2.0]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.long)
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=0.5)
    a1 = 2.0 - 1.0  # delta_1 = r_1 + 0 - V_1
    a0 = (0.0 + 1.0 - 0.5) + 0.5 * a1
    _close(adv, [[a0, a1]])
    _close(ret, [[a0 + 0.5, a1 + 1.0]])


def test_gae_accepts_float_and_bool_like_masks():
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(2, 4, generator=gen, dtype=F64)
    rewards = torch.randn(2, 4, generator=gen, dtype=F64)
    mask_long = _mask_from_lengths([2, 4], 4)
    a_long, r_long = gae(values, rewards, mask_long)
    a_float, r_float = gae(values, rewards, mask_long.to(F64))
    torch.testing.assert_close(a_long, a_float)
    torch.testing.assert_close(r_long, r_float)


# ----------------------------------------------------------------------------------- shaped rewards


def test_shaped_rewards_hand_computed():
    kl = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4],  # length 3: score at index 2
            [0.5, -0.5, 1.0, 2.0],  # length 4 (EOS at the last position): score at index 3
            [0.7, 0.8, 0.9, 1.0],  # length 1 (empty reply = stop token only): score at index 0
            [9.0, 9.0, 9.0, 9.0],  # all padding: nothing
        ],
        dtype=F64,
    )
    mask = _mask_from_lengths([3, 4, 1, 0], 4)
    scores = torch.tensor([1.0, -2.0, 3.0, 100.0], dtype=F64)
    beta = 0.5
    rewards, non_score = shaped_rewards(scores, kl, mask, kl_coef=beta)

    expected_non_score = [
        [-0.05, -0.1, -0.15, 0.0],
        [-0.25, 0.25, -0.5, -1.0],
        [-0.35, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    expected_rewards = [
        [-0.05, -0.1, -0.15 + 1.0, 0.0],
        [-0.25, 0.25, -0.5, -1.0 - 2.0],
        [-0.35 + 3.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    _close(non_score, expected_non_score)
    _close(rewards, expected_rewards)
    # the score sits on the last real token, not one past it (and not on the first padding token)
    assert rewards[0, 3] == 0 and rewards[2, 1] == 0
    # inputs not mutated
    assert kl[3, 0] == 9.0


def test_shaped_rewards_sum_is_score_minus_kl_sum():
    gen = torch.Generator().manual_seed(21)
    T = 10
    lengths = [10, 4, 1, 7]
    mask = _mask_from_lengths(lengths, T)
    kl = torch.randn(len(lengths), T, generator=gen, dtype=F64)
    scores = torch.randn(len(lengths), generator=gen, dtype=F64)
    rewards, non_score = shaped_rewards(scores, kl, mask, kl_coef=0.05)
    torch.testing.assert_close(rewards.sum(-1), scores - 0.05 * (kl * mask).sum(-1))
    torch.testing.assert_close(rewards - non_score, torch.zeros_like(rewards).index_put_(
        (torch.arange(len(lengths)), torch.tensor(lengths) - 1), scores))
    assert ((rewards * (1 - mask)) == 0).all()


def test_shaped_rewards_all_padding_batch_no_error():
    kl = torch.ones(2, 3)
    mask = torch.zeros(2, 3, dtype=torch.long)
    rewards, non_score = shaped_rewards(torch.tensor([5.0, -5.0]), kl, mask, kl_coef=0.1)
    assert torch.equal(rewards, torch.zeros(2, 3))
    assert torch.equal(non_score, torch.zeros(2, 3))


def test_shaped_rewards_zero_kl_coef_leaves_only_score():
    kl = torch.full((1, 3), 4.0)
    mask = _mask_from_lengths([2], 3)
    rewards, non_score = shaped_rewards(torch.tensor([0.75]), kl, mask, kl_coef=0.0)
    assert torch.equal(non_score.abs(), torch.zeros(1, 3))
    _close(rewards, [[0.0, 0.75, 0.0]])


# ------------------------------------------------------------------------------- truncate after stop

PAD, EOS, EOT = 0, 2, 3


def test_truncate_after_stop_cases():
    responses = torch.tensor(
        [
            [5, 6, EOS, 7, 8, EOS],  # stop in the middle; second EOS after it is padded too
            [EOS, 5, 6, 7, 8, 9],  # stop at position 0: empty reply = just the stop token
            [5, 6, 7, 8, 9, EOS],  # stop at the last position
            [5, 6, 7, 8, 9, 10],  # no stop at all
            [5, EOT, 6, EOS, 7, 8],  # second stop id comes first
            [5, 6, 7, EOS, EOT, 9],  # adjacent stop ids: the first one wins
        ]
    )
    out, mask, has_stop = truncate_after_stop(responses, [EOS, EOT], PAD)
    expected_out = torch.tensor(
        [
            [5, 6, EOS, PAD, PAD, PAD],
            [EOS, PAD, PAD, PAD, PAD, PAD],
            [5, 6, 7, 8, 9, EOS],
            [5, 6, 7, 8, 9, 10],
            [5, EOT, PAD, PAD, PAD, PAD],
            [5, 6, 7, EOS, PAD, PAD],
        ]
    )
    expected_mask = _mask_from_lengths([3, 1, 6, 6, 2, 4], 6)
    assert torch.equal(out, expected_out)
    assert torch.equal(mask, expected_mask)
    assert has_stop.tolist() == [True, True, True, False, True, True]
    # the stop token itself is inside the mask, at the last real position
    for b in [0, 1, 2, 4, 5]:
        assert out[b, last_index(mask)[b]].item() in (EOS, EOT)
    # input not mutated
    assert responses[0, 5] == EOS


def test_truncate_after_stop_only_listed_ids_stop():
    responses = torch.tensor([[5, EOT, 6, EOS]])
    out, mask, has_stop = truncate_after_stop(responses, [EOS], PAD)
    assert torch.equal(out, responses)
    assert mask.tolist() == [[1, 1, 1, 1]]
    assert has_stop.tolist() == [True]
    out, mask, has_stop = truncate_after_stop(responses, [], PAD)
    assert torch.equal(out, responses) and mask.all() and has_stop.tolist() == [False]


def test_truncate_after_stop_pad_id_is_used_and_dtypes():
    responses = torch.tensor([[1, 9, 1, 1]])
    out, mask, has_stop = truncate_after_stop(responses, [9], pad_id=-100)
    assert out.tolist() == [[1, 9, -100, -100]]
    assert out.dtype == responses.dtype
    assert mask.dtype == torch.long
    assert has_stop.dtype == torch.bool


# ------------------------------------------------------------------------------------------ KL


def test_kl_per_token_hand_values():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -0.5]], dtype=F64)
    k1 = kl_per_token(logp, ref, "k1")
    _close(k1, [[0.5, -1.0, 0.0]])
    k3 = kl_per_token(logp, ref, "k3")
    # k3 = (q/p - 1) - log(q/p), q/p = exp(ref - logp)
    expected = [(math.exp(r - lp) - 1) - (r - lp) for lp, r in zip([-1.0, -2.0, -0.5], [-1.5, -1.0, -0.5])]
    _close(k3, [expected])
    assert abs(expected[0] - (math.exp(-0.5) - 1 + 0.5)) < 1e-15
    assert abs(expected[1] - (math.e - 2.0)) < 1e-15


def test_kl_default_estimator_is_k1():
    logp = torch.tensor([[-0.3, -1.2]])
    ref = torch.tensor([[-0.7, -0.2]])
    assert torch.equal(kl_per_token(logp, ref), kl_per_token(logp, ref, "k1"))


def test_k3_nonnegative_and_zero_when_equal():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 32, generator=gen, dtype=F64) * 10
    ref = -torch.rand(64, 32, generator=gen, dtype=F64) * 10
    k3 = kl_per_token(logp, ref, "k3")
    assert (k3 >= 0).all()
    assert torch.equal(kl_per_token(logp, logp, "k3"), torch.zeros_like(logp))
    assert torch.equal(kl_per_token(logp, logp, "k1"), torch.zeros_like(logp))
    # k3 is second-order around 0: ~ 0.5 * (log ratio)^2 for small differences
    small = logp + 1e-4
    torch.testing.assert_close(kl_per_token(small, logp, "k3"), torch.full_like(logp, 0.5e-8), rtol=1e-3, atol=0)


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(torch.zeros(1, 2), torch.zeros(1, 2), "k2")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators_are_unbiased_for_true_kl(estimator):
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=F64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=F64)
    true_kl = float((p * (p / q).log()).sum())  # KL(p || q) ~= 0.2001
    samples = torch.multinomial(p, 200_000, replacement=True)
    est = kl_per_token(p.log()[samples].unsqueeze(0), q.log()[samples].unsqueeze(0), estimator)
    assert abs(est.mean().item() - true_kl) < 1e-2
    if estimator == "k3":
        assert (est >= 0).all()


# ---------------------------------------------------------------------------------- policy loss


def _policy_example():
    """Row 0: five real tokens exercising every branch, one masked token with garbage."""
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1]
    advs = [1.0, -1.0, -2.0, 1.0, 1.0]
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.7]], dtype=F64)
    logp = old.clone()
    logp[0, :5] += torch.tensor(ratios, dtype=F64).log()
    logp[0, 5] = 50.0  # garbage at the masked position
    adv = torch.tensor([[*advs, 1e6]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    return logp, old, adv, mask, ratios


def test_policy_loss_hand_computed_clipping_both_sides():
    logp, old, adv, mask, ratios = _policy_example()
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #  r=1.5 A=+1: max(-1.5, -1.2) = -1.2  (clipped, positive advantage)
    #  r=0.5 A=-1: max( 0.5,  0.8) =  0.8  (clipped, negative advantage)
    #  r=1.5 A=-2: max( 3.0,  2.4) =  3.0  (not clipped: pessimistic branch is unclipped)
    #  r=0.5 A=+1: max(-0.5, -0.8) = -0.5  (not clipped)
    #  r=1.1 A=+1: max(-1.1, -1.1) = -1.1  (inside the range)
    _close(loss, (-1.2 + 0.8 + 3.0 - 0.5 - 1.1) / 5)
    _close(stats["clipfrac"], 2 / 5, tol=1e-6)  # a float32 fraction
    _close(stats["approxkl"], sum(0.5 * math.log(r) ** 2 for r in ratios) / 5)
    mean_r = sum(ratios) / 5
    _close(stats["ratio_mean"], mean_r)
    _close(stats["ratio_var"], sum((r - mean_r) ** 2 for r in ratios) / 5)  # population variance
    _close(stats["ratio_max_dev"], 0.5)


def test_policy_loss_gradient_zero_on_clipped_and_masked_tokens():
    logp, old, adv, mask, ratios = _policy_example()
    logp.requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, clip_range=0.2)
    loss.backward()
    # d/dlogp of (-A r)/N = -A r / N on unclipped tokens; 0 where the clipped branch is active or masked
    expected = [0.0, 0.0, 2.0 * 1.5 / 5, -0.5 / 5, -1.1 / 5, 0.0]
    _close(logp.grad, [expected])


def test_policy_loss_ratio_exactly_one_when_logprobs_equal_old():
    gen = torch.Generator().manual_seed(2)
    logp = -torch.rand(3, 6, generator=gen) * 5
    adv = torch.randn(3, 6, generator=gen)
    mask = _mask_from_lengths([6, 2, 0], 6)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, clip_range=0.2)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["ratio_var"].item() == 0.0
    assert stats["approxkl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["ratio_max_dev"].item() == 0.0
    torch.testing.assert_close(loss, -masked_mean(adv, mask))


def test_policy_loss_padding_never_contributes():
    logp, old, adv, mask, _ = _policy_example()
    loss_a, stats_a = policy_loss(logp, old, adv, mask, clip_range=0.2)
    logp_b, old_b, adv_b = logp.clone(), old.clone(), adv.clone()
    logp_b[0, 5], old_b[0, 5], adv_b[0, 5] = -1e4, 1e4, -1e8  # large finite garbage
    loss_b, stats_b = policy_loss(logp_b, old_b, adv_b, mask, clip_range=0.2)
    assert torch.isfinite(loss_b)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for key in stats_a:
        assert torch.isfinite(stats_b[key]), key
        torch.testing.assert_close(stats_a[key], stats_b[key], rtol=0, atol=0)
    # appending an all-padding row with garbage changes nothing either
    pad_row = torch.full((1, 6), 123.0, dtype=F64)
    loss_c, stats_c = policy_loss(
        torch.cat([logp, pad_row]), torch.cat([old, -pad_row]), torch.cat([adv, pad_row]),
        torch.cat([mask, torch.zeros_like(mask)]), clip_range=0.2,
    )
    torch.testing.assert_close(loss_a, loss_c)
    for key in stats_a:
        torch.testing.assert_close(stats_a[key], stats_c[key])


def test_policy_loss_empty_mask_is_zero_not_nan():
    logp = torch.randn(2, 3)
    loss, stats = policy_loss(logp, logp + 1.0, torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long), 0.2)
    assert loss.item() == 0.0
    for key, value in stats.items():
        assert torch.isfinite(value), key
        assert value.item() == 0.0, key


# ----------------------------------------------------------------------------------- value loss


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.6, 0.0, 2.0, 0.0, 7.0]], dtype=F64)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5, 1.0, -7.0]], dtype=F64)
    returns = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # clipped V: 0.7, 0.6, 0.3, 0.7, 0.8
    # unclipped err: 0.0, 0.16, 1.0, 4.0, 0.0 ; clipped err: 0.09, 0.16, 0.49, 0.49, 0.64
    # max: 0.09 (clipped), 0.16 (inside), 1.0, 4.0, 0.64 (clipped)
    _close(loss, 0.5 * (0.09 + 0.16 + 1.0 + 4.0 + 0.64) / 5)
    _close(stats["clipfrac"], 2 / 5, tol=1e-6)  # a float32 fraction


def test_value_loss_unclipped_when_inside_range():
    gen = torch.Generator().manual_seed(4)
    old = torch.randn(2, 5, generator=gen, dtype=F64)
    values = old + (torch.rand(2, 5, generator=gen, dtype=F64) - 0.5) * 0.1  # |V - V_old| < 0.05
    returns = torch.randn(2, 5, generator=gen, dtype=F64)
    mask = _mask_from_lengths([5, 3], 5)
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    torch.testing.assert_close(loss, 0.5 * masked_mean((values - returns) ** 2, mask))
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_gradient_and_padding():
    values = torch.tensor([[1.0, 0.0, 3.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, -1e5]], dtype=F64)
    returns = torch.tensor([[1.0, 1.0, 1e5]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    loss, _ = value_loss(values, old, returns, mask, clip_range_value=0.2)
    loss.backward()
    # token 0: clipped branch wins (constant in V) -> grad 0; token 1: unclipped, 0.5*2*(V-R)/2 = -0.5
    _close(loss, 0.5 * (0.09 + 1.0) / 2)
    _close(values.grad, [[0.0, -0.5, 0.0]])


# ------------------------------------------------------------------------- masked stats / whiten


def test_masked_sum_and_mean_against_plain():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    _close(masked_sum(x, mask), 7.0)
    _close(masked_sum(x, mask, dim=1), [3.0, 4.0])
    _close(masked_mean(x, mask), 7.0 / 3)
    _close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    _close(masked_mean(x, mask, dim=0), [2.5, 2.0, 0.0])  # empty column -> 0, not NaN


def test_masked_mean_empty_mask_is_zero_not_nan():
    x = torch.tensor([[1.0, 2.0]])
    mask = torch.zeros(1, 2)
    assert masked_mean(x, mask).item() == 0.0
    assert masked_mean(x, mask, dim=1).tolist() == [0.0]
    assert masked_var(x, mask).item() == 0.0
    assert masked_var(x, mask, unbiased=False).item() == 0.0


def test_masked_var_against_plain():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 7, generator=gen, dtype=F64)
    mask = _mask_from_lengths([7, 3, 0, 1], 7)
    selected = x[mask.bool()]
    torch.testing.assert_close(masked_var(x, mask), selected.var(unbiased=True))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), selected.var(unbiased=False))
    values = selected.tolist()
    mu = sum(values) / len(values)
    _close(masked_var(x, mask), sum((v - mu) ** 2 for v in values) / (len(values) - 1))
    # a single element: variance 0 (no division by zero)
    one = torch.zeros(1, 3)
    one[0, 0] = 1.0
    assert masked_var(torch.tensor([[4.0, 9.0, 9.0]]), one).item() == 0.0


def test_whiten_local_statistics():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3, 6, generator=gen, dtype=F64) * 3 + 2
    mask = _mask_from_lengths([6, 4, 0], 6)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = whiten(x, mask, mean, var)
    on = mask.bool()
    expected = (x[on] - mean) / torch.sqrt(var + 1e-8)
    torch.testing.assert_close(out[on], expected)
    assert (out[~on] == 0).all()
    torch.testing.assert_close(masked_mean(out, mask), torch.tensor(0.0, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(masked_var(out, mask), torch.tensor(1.0, dtype=F64), atol=1e-6, rtol=0)


def test_whiten_with_global_statistics_passed_in():
    x = torch.tensor([[1.0, 3.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    mean, var = torch.tensor(5.0, dtype=F64), torch.tensor(4.0, dtype=F64)  # e.g. from an all-gather
    out = whiten(x, mask, mean, var)
    s = math.sqrt(4.0 + 1e-8)
    _close(out, [[(1.0 - 5.0) / s, (3.0 - 5.0) / s, 0.0]])


def test_whiten_shift_mean_false_keeps_the_mean():
    x = torch.tensor([[1.0, 3.0, 8.0, -50.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = whiten(x, mask, mean, var, shift_mean=False)
    s = math.sqrt(float(var) + 1e-8)
    m = float(mean)
    _close(out, [[(1.0 - m) / s + m, (3.0 - m) / s + m, (8.0 - m) / s + m, 0.0]])
    torch.testing.assert_close(masked_mean(out, mask), mean)
    # all-positive inputs keep their (positive) mean
    assert masked_mean(out, mask).item() > 0


def test_whiten_all_padding_and_zero_variance_are_finite():
    x = torch.full((2, 3), 7.0)
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    out = whiten(x, mask, masked_mean(x, mask), masked_var(x, mask))
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------- indices


def test_first_true_index():
    bools = torch.tensor(
        [
            [False, True, False, True],
            [True, False, False, False],
            [False, False, False, True],
            [False, False, False, False],
        ]
    )
    assert first_true_index(bools).tolist() == [1, 0, 3, 4]


def test_last_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert last_index(mask).tolist() == [2, 0, 3, 0]
    assert last_index(mask.float()).tolist() == [2, 0, 3, 0]
    assert last_index(mask.bool()).tolist() == [2, 0, 3, 0]


# ----------------------------------------------------------------------------- logits helpers


def test_entropy_uniform_is_log_vocab():
    for vocab in [2, 7, 50]:
        ent = entropy_from_logits(torch.full((3, 4, vocab), 1.234))
        torch.testing.assert_close(ent, torch.full((3, 4), math.log(vocab)))


def test_entropy_matches_plain_and_peaked_is_near_zero():
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=F64)
    ent = entropy_from_logits(logits)
    assert ent.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            z = [math.exp(v) for v in logits[b, t].tolist()]
            probs = [v / sum(z) for v in z]
            expected = -sum(p * math.log(p) for p in probs)
            assert abs(ent[b, t].item() - expected) < 1e-5
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    assert entropy_from_logits(peaked).item() < 1e-30 + 1e-6


def test_logprobs_from_logits_temperature():
    gen = torch.Generator().manual_seed(19)
    logits = torch.randn(2, 4, 6, generator=gen)
    tokens = torch.randint(0, 6, (2, 4), generator=gen)
    for temperature in [1.0, 0.7, 2.5]:
        lp = logprobs_from_logits(logits, tokens, temperature=temperature)
        manual = torch.log_softmax(logits / temperature, dim=-1)
        for b in range(2):
            for t in range(4):
                assert abs(lp[b, t].item() - manual[b, t, tokens[b, t]].item()) < 1e-6
    # default temperature is 1
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), logprobs_from_logits(logits, tokens, 1.0))
    # temperature matters (the wrong temperature gives different logprobs)
    assert not torch.allclose(logprobs_from_logits(logits, tokens, 0.7), logprobs_from_logits(logits, tokens))
    # probabilities of all tokens sum to 1 under the tempered distribution
    all_tokens = torch.arange(6).expand(1, 6)
    lp_all = logprobs_from_logits(logits[:1, :1].expand(1, 6, 6), all_tokens, temperature=0.7)
    torch.testing.assert_close(lp_all.exp().sum(), torch.tensor(1.0))


def test_logprobs_from_logits_upcasts_to_fp32():
    logits = torch.randn(1, 3, 8).to(torch.bfloat16)
    tokens = torch.tensor([[1, 2, 3]])
    lp = logprobs_from_logits(logits, tokens, temperature=0.5)
    assert lp.dtype == torch.float32
    manual = torch.log_softmax(logits.float() / 0.5, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp, manual)


# ------------------------------------------------------------------------------ KL controllers


def test_fixed_kl_controller_is_constant():
    ctl = FixedKLController(0.05)
    for kl in [0.0, 1.0, 100.0, -3.0]:
        ctl.update(kl, 512)
        assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_formula():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(7.0, 256)
    expected = 0.1 * (1 + (7.0 / 6.0 - 1.0) * 256 / 10_000)
    assert ctl.value == pytest.approx(expected, rel=1e-12)

    # clipped to +0.2 when far above target
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(600.0, 1000)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1), rel=1e-12)

    # clipped to -0.2 when far below target
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(0.0, 1000)
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 0.1), rel=1e-12)

    # at the target nothing changes
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(6.0, 1000)
    assert ctl.value == pytest.approx(0.1, rel=1e-12)


def test_adaptive_kl_controller_direction_and_sequence():
    up = AdaptiveKLController(0.2, target=1.0, horizon=100)
    down = AdaptiveKLController(0.2, target=1.0, horizon=100)
    ref_up = ref_down = 0.2
    for _ in range(5):
        before_up, before_down = up.value, down.value
        up.update(1.1, 10)
        down.update(0.95, 10)
        ref_up *= 1 + 0.1 * 10 / 100
        ref_down *= 1 - 0.05 * 10 / 100
        assert up.value > before_up
        assert down.value < before_down
    assert up.value == pytest.approx(ref_up, rel=1e-12)
    assert down.value == pytest.approx(ref_down, rel=1e-12)


def test_adaptive_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    for kl in [10.0, 3.0, 7.5]:
        ctl.update(kl, 64)
    state = ctl.state_dict()
    restored = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    ctl.update(8.0, 64)
    restored.update(8.0, 64)
    assert restored.value == ctl.value


def test_adaptive_kl_controller_rejects_bad_arguments():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)


def test_make_kl_controller():
    fixed = make_kl_controller(0.05, adaptive=False, target=None, horizon=10_000)
    assert type(fixed) is FixedKLController and fixed.value == 0.05
    adaptive = make_kl_controller(0.05, adaptive=True, target=6.0, horizon=10_000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.05, 6.0, 10_000)
    with pytest.raises(ValueError, match="kl_target"):
        make_kl_controller(0.05, adaptive=True, target=None, horizon=10_000)
    with pytest.raises(ValueError):
        make_kl_controller(0.05, adaptive=True, target=-1.0, horizon=10_000)
