"""Held-out evaluation of a reward model: accuracy (ties count as wrong), margins, subsets, calibration."""

from __future__ import annotations

import math
from collections import defaultdict

from .scoring import RewardScorer, pair_to_ids


def evaluate_pairs(scorer: RewardScorer, pairs: list[dict], batch_size: int = 64) -> dict:
    """Score both sides of every pair; report overall and per ``subset`` (when pairs carry one)."""
    margins = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids = [pair_to_ids(scorer.tokenizer, p, scorer.max_length) for p in chunk]
        rewards = scorer.score_ids([c for c, _, _ in ids] + [r for _, r, _ in ids])
        margins += [c - r for c, r in zip(rewards[: len(chunk)], rewards[len(chunk) :])]
    groups = defaultdict(list)
    for pair, margin in zip(pairs, margins):
        groups[str(pair.get("subset", ""))].append(margin)
    report = {"overall": _stats(margins), "margins": margins}
    if len(groups) > 1 or "" not in groups:
        report["subsets"] = {name: _stats(values) for name, values in sorted(groups.items())}
    return report


def _stats(margins: list[float]) -> dict:
    n = len(margins)
    return {
        "accuracy": sum(m > 0 for m in margins) / n if n else float("nan"),  # a tie is not a correct ranking
        "mean_margin": sum(margins) / n if n else float("nan"),
        "ties": sum(m == 0 for m in margins),
        "n": n,
    }


def print_report(report: dict, title: str = "evaluation") -> None:
    rows = [("overall", report["overall"])] + list(report.get("subsets", {}).items())
    print(f"{title}\n{'subset':<32} {'pairs':>7} {'accuracy':>9} {'margin':>8} {'ties':>5}")
    for name, s in rows:
        print(f"{name[:32]:<32} {s['n']:>7} {s['accuracy']:>9.3f} {s['mean_margin']:>8.3f} {s['ties']:>5}")


def calibration_bins(margins: list[float], n_bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean predicted P, observed frequency, count) per bin of P(chosen) = sigmoid(margin).

    Each pair is counted both ways round, (sigmoid(m), 1) and (sigmoid(-m), 0), so the diagram is
    symmetric and every bin can be filled.
    """
    bins = [[0.0, 0, 0] for _ in range(n_bins)]
    for m in margins:
        for p, outcome in ((1 / (1 + math.exp(-m)), 1), (1 / (1 + math.exp(m)), 0)):
            b = bins[min(n_bins - 1, int(p * n_bins))]
            b[0] += p
            b[1] += outcome
            b[2] += 1
    return [(s / c, k / c, c) for s, k, c in bins if c]


def calibration_plot(margins: list[float], path: str, title: str = "reward model calibration") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = calibration_bins(margins)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot([p for p, _, _ in points], [f for _, f, _ in points], "o-", label="reward model")
    ax.set_xlabel("predicted P(chosen preferred) = sigmoid(margin)")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
