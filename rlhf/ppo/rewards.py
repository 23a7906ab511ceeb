"""Reward sources: a local reward model, the scoring API, a Python function -- one or several, weighted.

Every source is a callable ``(prompts, responses, **columns) -> list[float]``: ``prompts`` are lists of
messages, ``responses`` the decoded replies, and ``columns`` the prompt records' other dataset fields as
lists aligned with them (a verifier's reference answer, say; ``rlhf.data.loading.FORMAT_FIELDS``). A
reward model's scores are normalized by the statistics stored with it, so the KL coefficient means the
same whichever RM is used (docs/design.md, detail 9).

``CompositeReward`` is what PPO calls: the weighted sum of its sources, each checked (it must answer
one finite number per reply) and named in the error when it does not, with per-source means kept for
logging (``reward/<name>`` as used, ``reward/<name>_raw`` before an RM's normalization).
"""

from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass


class RewardSourceError(RuntimeError):
    """A reward source failed or answered something unusable; the message names it."""


class LocalRewardModel:
    """Scores with ``reward_models.scoring.RewardScorer``: the same rendering as RM training and the API."""

    def __init__(self, path: str, device=None, normalize: bool = True, batch_size: int = 64):
        from reward_models.scoring import RewardScorer

        self.scorer = RewardScorer(path, device=str(device) if device is not None else None)
        self.normalize, self.batch_size = normalize, batch_size
        self.last_raw: list[float] | None = None

    def __call__(self, prompts, responses, **columns):
        items = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]
        results = self.scorer.score(items, truncate=True, batch_size=self.batch_size)
        self.last_raw = [r["reward"] for r in results]
        return [r["normalized_reward"] if self.normalize else r["reward"] for r in results]


def load_function(spec: str, per_item: bool = False):
    """``gold`` (the demo task's gold reward) or ``package.module:function``.

    The function takes ``(prompts, responses, **columns)`` and returns a list of floats; ``per_item=True``
    wraps the older one-reply form ``(prompt, response) -> float`` (what ``reward_function`` takes).
    """
    if spec == "gold":
        from ..data.demo_task import gold_rewards

        return gold_rewards
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"reward function {spec!r}: expected 'gold' or 'module:function'")
    fn = getattr(importlib.import_module(module), name)
    if per_item:
        return lambda prompts, responses, **columns: [float(fn(p, r)) for p, r in zip(prompts, responses)]
    return fn


@dataclass
class Source:
    name: str
    fn: object  # (prompts, responses, **columns) -> list[float]
    weight: float = 1.0


class CompositeReward:
    """The weighted sum of several sources, each checked and named; ``last`` holds their means for logging."""

    def __init__(self, sources: list[Source]):
        if not sources:
            raise ValueError("no reward source")
        self.sources, self.last = sources, {}

    def __call__(self, prompts, responses, **columns) -> list[float]:
        total, self.last = [0.0] * len(responses), {}
        for source in self.sources:
            try:
                values = [float(v) for v in source.fn(prompts, responses, **columns)]
            except Exception as e:
                raise RewardSourceError(f"reward source {source.name!r} failed: {type(e).__name__}: {e}") from e
            if len(values) != len(responses):
                raise RewardSourceError(f"reward source {source.name!r} returned {len(values)} values for "
                                        f"{len(responses)} replies")
            bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                raise RewardSourceError(f"reward source {source.name!r} returned a non-finite value ({values[bad]}) "
                                        f"for reply {bad}: {responses[bad][:80]!r}")
            raw = getattr(source.fn, "last_raw", None) or values
            self.last[f"reward/{source.name}"] = sum(values) / len(values)
            self.last[f"reward/{source.name}_raw"] = sum(raw) / len(raw)
            total = [t + source.weight * v for t, v in zip(total, values)]
        return total


def _remote(url: str, normalize: bool):
    from reward_models.client import RemoteRewardFunction, RewardClient

    client = RewardClient(url, api_key=os.environ.get("RLHF_API_KEY"))
    remote = RemoteRewardFunction(client, normalized=normalize, truncate=True)
    return lambda prompts, responses, **columns: remote(prompts, responses)


def parse_source(spec: dict | str, device, normalize: bool) -> Source:
    """One entry of ``rewards``: ``{model|url|function: ..., weight: 1.0, name: ..., per_item: false}``
    (a JSON string on the command line)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"rewards entry {spec!r}: expected an object such as "
                             '{"function": "module:fn", "weight": 0.5}') from e
    kinds = [k for k in ("model", "url", "function") if k in spec]
    unknown = set(spec) - {"model", "url", "function", "weight", "name", "per_item", "normalize"}
    if len(kinds) != 1 or unknown:
        raise ValueError(f"rewards entry {spec}: give exactly one of model, url, function (plus weight, name, "
                         f"per_item, normalize){f'; unknown {sorted(unknown)}' if unknown else ''}")
    kind, target = kinds[0], spec[kinds[0]]
    norm = bool(spec.get("normalize", normalize))
    if kind == "model":
        fn, default = LocalRewardModel(target, device=device, normalize=norm), "reward_model"
    elif kind == "url":
        fn, default = _remote(target, norm), "reward_api"
    else:
        fn, default = load_function(target, per_item=bool(spec.get("per_item", False))), target.rpartition(":")[2]
    return Source(str(spec.get("name", default)), fn, float(spec.get("weight", 1.0)))


def make_reward_source(cfg, device) -> CompositeReward:
    """The stage's reward: ``rewards`` (several), or the one-source keys ``reward_model`` / ``reward_url`` /
    ``reward_function``."""
    normalize = cfg.reward_normalization
    if cfg.rewards:
        specs = cfg.rewards
    elif cfg.reward_model:
        specs = [{"model": cfg.reward_model}]
    elif cfg.reward_url:
        specs = [{"url": cfg.reward_url}]
    else:  # the one-source key keeps the one-reply signature of earlier releases
        specs = [{"function": cfg.reward_function, "per_item": cfg.reward_function != "gold"}]
    sources = [parse_source(spec, device, normalize) for spec in specs]
    names = [s.name for s in sources]
    for i, source in enumerate(sources):  # names must be unique: they key the logged metrics
        if names.count(source.name) > 1:
            source.name = f"{source.name}_{i}"
    return CompositeReward(sources)


def gold_source(dataset: str):
    """The demo task's gold reward when training on it (for logging only), else None."""
    return load_function("gold") if dataset == "demo" else None
