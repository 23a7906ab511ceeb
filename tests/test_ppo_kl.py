"""rlhf/ppo/kl.py: the KL estimators (hand values, unbiasedness) and the fixed / adaptive controllers."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, kl_per_token, make_kl_controller
from tests.ppo_math_helpers import F64, _close

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
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(torch.zeros(1, 2), torch.zeros(1, 2), "k4")


@pytest.mark.parametrize("estimator", ["k1", "k3"])  # k2 is biased
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


def test_k2_is_half_the_squared_log_ratio():
    logp, ref = torch.tensor([[-0.3, -1.2]]), torch.tensor([[-0.7, -0.2]])
    _close(kl_per_token(logp, ref, "k2"), [[0.5 * 0.4**2, 0.5 * 1.0**2]], tol=1e-6)
