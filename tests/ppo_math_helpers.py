"""Helpers shared by the pure-math tests (plain-Python references are in each test file)."""

import torch

F64 = torch.float64


def _mask_from_lengths(lengths: list[int], T: int) -> torch.Tensor:
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths], dtype=torch.long)


def _close(actual, expected, tol: float = 1e-9) -> None:
    actual = torch.as_tensor(actual, dtype=F64)
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
