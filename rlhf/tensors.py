"""Small torch helpers shared by every stage: padding ragged rows, and seeded generators."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def pad_rows(rows: Sequence[Sequence[int]], pad_value: int, side: str = "right", width: int | None = None,
             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows of token ids -> (ids [B, W], mask [B, W]), W = the longest row (at least ``width``).

    ``side="left"`` puts every row's end in the last column (prompts for generation: the reply starts in
    the same column for all rows); ``"right"`` puts every start in column 0.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max([width or 0, *(len(r) for r in rows)])
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return (ids.to(device), mask.to(device)) if device is not None else (ids, mask)


def seeded_generator(*keys: int | str) -> torch.Generator:
    """A CPU generator whose stream is a function of ``keys`` alone, e.g. (seed, step, epoch, rank).

    Why: whatever a step draws (prompt order, minibatch order, PPO-ptx batches) depends on where the run
    is, never on how many numbers were drawn before, so a run resumed from a checkpoint draws exactly
    what an uninterrupted run draws (tested by killing and resuming a PPO run). A hash of the keys, not
    ``seed * prime + step``, so no two key tuples share a seed by arithmetic accident.
    """
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
