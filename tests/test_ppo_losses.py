"""rlhf/ppo/losses.py: clipped policy and value losses by hand, gradients, padding; logprobs and entropy."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from rlhf.ppo.masked import masked_mean
from tests.ppo_math_helpers import F64, _close, _mask_from_lengths

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


def test_chunked_logprobs_and_entropy_equal_the_full_softmax_with_gradients(monkeypatch):
    import rlhf.ppo.losses as losses

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=gen, dtype=torch.float32, requires_grad=True)
    tokens = torch.randint(50, (3, 5), generator=gen)
    full = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (full_grad,) = torch.autograd.grad(full.sum(), logits)
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 50 * 2)  # two rows per chunk: eight chunks
    chunked = losses.logprobs_from_logits(logits, tokens, 0.7)
    (chunked_grad,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(chunked_grad, full_grad)
    p = torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(losses.entropy_from_logits(logits.detach()), -(p * p.log()).sum(-1))


def test_loss_aggregation_modes_by_hand():
    from rlhf.ppo.losses import Normalizer, aggregate_loss

    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate_loss(per_token, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    # split in two micro-batches whose shares are divided by the whole batch's counts: they add up
    norm = Normalizer(tokens=4.0, sequences=2.0)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        halves = sum(aggregate_loss(per_token[i : i + 1], mask[i : i + 1], mode, norm) for i in (0, 1))
        assert halves.item() == pytest.approx(aggregate_loss(per_token, mask, mode).item())
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(per_token, mask, "sum")


def test_clip_higher_widens_only_the_upper_side():
    old = torch.zeros(1, 2, dtype=F64)
    logp = torch.tensor([[math.log(1.25), math.log(0.7)]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0]], dtype=F64)
    mask = torch.ones(1, 2)
    _, symmetric = policy_loss(logp, old, adv, mask, clip_range=0.2)
    _, higher = policy_loss(logp, old, adv, mask, clip_range=0.2, clip_range_high=0.28)
    assert symmetric["clipfrac"].item() == pytest.approx(1.0)  # 1.25 > 1.2 and 0.7 < 0.8: both clipped
    assert higher["clipfrac"].item() == pytest.approx(0.5)  # 1.25 < 1.28 now passes; 0.7 still clipped
