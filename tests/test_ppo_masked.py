"""rlhf/ppo/masked.py: masked sums, means, variances and whitening against plain references."""

from __future__ import annotations

import math

import torch

from rlhf.ppo.masked import last_index, masked_mean, masked_sum, masked_var, whiten
from tests.ppo_math_helpers import F64, _close, _mask_from_lengths

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







def test_last_index():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert last_index(mask).tolist() == [2, 0, 3, 0]
    assert last_index(mask.float()).tolist() == [2, 0, 3, 0]
    assert last_index(mask.bool()).tolist() == [2, 0, 3, 0]
