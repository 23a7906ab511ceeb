"""What a PPO step reports: phase timings, running means over micro-steps, rollout statistics.

Names follow TRL 1.12's PPOTrainer where it had one (``objective/*``, ``policy/*``, ``loss/*``, ``val/*``,
``lr``, ``eps``); ours add ``rollout/*``, ``time/*``, ``train/*``. Every figure is averaged over processes
(docs/design.md, principle 3) before it is logged.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer(dict):
    """``with timer("time/generate"): ...`` adds the seconds spent to that key."""

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


class RunningMeans:
    """Means of scalar statistics over the micro-steps of an update."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, stats: dict) -> None:
        for key, value in stats.items():
            self.sums[key] += float(value)
            self.counts[key] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def rollout_statistics(ro, kl: torch.Tensor, non_score: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-process figures of one rollout (means over sequences; ``val/num_eos_tokens`` a count)."""
    return {
        "objective/kl": kl.sum(1).mean(),
        "objective/entropy": (-ro.logprobs * mask).sum(1).mean(),
        "objective/non_score_reward": non_score.sum(1).mean(),
        "objective/rlhf_reward": (ro.scores + non_score.sum(1)).mean(),
        "objective/scores": ro.scores.mean(),
        "objective/raw_scores": ro.raw_scores.mean(),
        "rollout/eos_rate": ro.has_stop.float().mean(),
        "rollout/response_length": mask.sum(1).mean(),
        "val/num_eos_tokens": ro.has_stop.float().sum(),
    }
