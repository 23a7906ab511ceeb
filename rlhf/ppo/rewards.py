"""Reward sources for PPO: a local reward model, the scoring API, or a Python function.

Each is a callable ``(prompts: list[list[dict]], responses: list[str]) -> list[float]``. Scores from a
reward model are normalized with the statistics stored with it, so the KL coefficient means the same
whichever RM is used (docs/design.md, detail 9).
"""

from __future__ import annotations

import importlib


class LocalRewardModel:
    """Scores with ``reward_models.scoring.RewardScorer``: the same rendering as RM training and the API."""

    def __init__(self, path: str, device=None, normalize: bool = True, batch_size: int = 64):
        from reward_models.scoring import RewardScorer

        self.scorer = RewardScorer(path, device=str(device) if device is not None else None)
        self.normalize, self.batch_size = normalize, batch_size

    def __call__(self, prompts, responses):
        items = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]
        results = self.scorer.score(items, truncate=True, batch_size=self.batch_size)
        return [r["normalized_reward"] if self.normalize else r["reward"] for r in results]


def load_function(spec: str):
    """``gold`` (the demo task's gold reward) or ``package.module:function``."""
    if spec == "gold":
        from ..data.demo_task import gold_rewards

        return gold_rewards
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"reward_function {spec!r}: expected 'gold' or 'module:function'")
    fn = getattr(importlib.import_module(module), name)
    return lambda prompts, responses: [float(fn(p, r)) for p, r in zip(prompts, responses)]


def make_reward_source(cfg, device):
    if cfg.reward_model:
        return LocalRewardModel(cfg.reward_model, device=device, normalize=cfg.reward_normalization)
    if cfg.reward_url:
        import os

        from reward_models.client import RemoteRewardFunction, RewardClient

        client = RewardClient(cfg.reward_url, api_key=os.environ.get("RLHF_API_KEY"))
        return RemoteRewardFunction(client, normalized=cfg.reward_normalization, truncate=True)
    return load_function(cfg.reward_function)


def gold_source(dataset: str):
    """The demo task's gold reward when training on it (for logging only), else None."""
    return load_function("gold") if dataset == "demo" else None
