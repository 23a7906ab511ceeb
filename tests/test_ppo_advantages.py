"""rlhf/ppo/advantages.py: GAE against a plain loop and hand values, KL-shaped rewards; EOS at the
last position, one-token and all-padding rows, garbage under the mask."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo.advantages import gae, shaped_rewards
from tests.ppo_math_helpers import F64, _close, _mask_from_lengths

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


# ------------------------------------------------------------------------------- critic-free estimators

GROUP_SCORES = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, -1.0, 1.0])
GROUP_IDS = torch.tensor([0, 0, 0, 1, 1, 1, 7, 7])  # any integers; group 1 all equal; group 7 of two


def test_grpo_normalizes_by_the_group_mean_and_unbiased_std():
    from rlhf.ppo.advantages import group_advantages

    mask = _mask_from_lengths([3, 1, 2, 2, 2, 0, 4, 1], 4)  # a padding-only row (6) gets nothing
    adv = group_advantages(GROUP_SCORES, GROUP_IDS, mask, "grpo", eps=0.0)
    # group 0: mean 2, unbiased std 1 -> -1, 0, 1; group 1: equal rewards -> 0; group 7: mean 0, std sqrt(2)
    expected = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)]
    _close(adv[:, 0] * mask[:, 0], torch.tensor(expected, dtype=F64) * mask[:, 0], tol=1e-6)
    assert (adv[mask == 0] == 0).all() and (adv[0, :3] == adv[0, 0]).all()  # the same on every real token


def test_dr_grpo_and_rloo_by_hand():
    from rlhf.ppo.advantages import group_advantages

    mask = torch.ones(8, 2)
    dr = group_advantages(GROUP_SCORES, GROUP_IDS, mask, "dr_grpo")[:, 0]
    _close(dr, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 1.0], tol=1e-6)  # no std division
    rloo = group_advantages(GROUP_SCORES, GROUP_IDS, mask, "rloo")[:, 0]
    # leave-one-out: 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2; -1 - 1, 1 - (-1)
    _close(rloo, [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0, -2.0, 2.0], tol=1e-6)


def test_one_sample_groups_are_refused_with_the_fix():
    from rlhf.ppo.advantages import group_advantages

    with pytest.raises(ValueError, match="needs samples_per_prompt >= 2"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]), torch.ones(3, 2), "rloo")
    with pytest.raises(ValueError, match="not a group estimator"):
        group_advantages(GROUP_SCORES, GROUP_IDS, torch.ones(8, 2), "gae")


def test_rewards_to_go_by_hand():
    from rlhf.ppo.advantages import rewards_to_go

    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]], dtype=F64)
    mask = _mask_from_lengths([3, 1], 4)
    _close(rewards_to_go(rewards, mask), [[6.0, 5.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    _close(rewards_to_go(rewards, mask, gamma=0.5)[0], [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0])
