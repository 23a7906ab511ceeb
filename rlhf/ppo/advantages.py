"""From scores to advantages, pure torch: KL-shaped per-token rewards and GAE (docs/design.md, details 7-9).

Shapes as in ``masked``: scores [B], everything else [B, T] with a response mask. Sources: OpenAI
lm-human-preferences; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO";
Schulman et al. 2016 (GAE).
"""

from __future__ import annotations

import torch

from .masked import last_index


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * kl on every real token, plus the sequence score on its last one.

    scores [B], kl [B, T], mask [B, T] -> (rewards [B, T], non_score_rewards [B, T]); both 0 after the
    stop token. A row with an empty mask receives nothing (its score has no token to land on).
    """
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    has_tokens = mask.sum(-1) > 0
    rewards[rows[has_tokens], last_index(mask)[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards, non_score


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. values, rewards, mask [B, T] -> (advantages, returns) [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  R_t = A_t + V_t,
    with V and r taken as 0 after the stop token, so the bootstrap from the last real token is 0 and
    nothing leaks across the boundary; advantages and returns are 0 on padding.
    """
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------------------------
# critic-free estimators (docs/design.md, "Advantage estimators")

ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
NEEDS_CRITIC = {"gae"}
GROUPED = {"grpo", "dr_grpo", "rloo"}


def _group_stats(scores: torch.Tensor, groups: torch.Tensor, min_size: int):
    """Per-sample group size, mean and unbiased std, from group ids [B] (any integers)."""
    _, index, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    if int(counts.min()) < min_size:
        raise ValueError(f"a group has {int(counts.min())} sample(s): this estimator compares the samples of one "
                         f"prompt and needs samples_per_prompt >= {min_size}")
    scores = scores.to(torch.float64)
    sums = torch.zeros(len(counts), dtype=torch.float64, device=scores.device).index_add_(0, index, scores)
    mean = (sums / counts)[index]
    squares = torch.zeros_like(sums).index_add_(0, index, (scores - mean) ** 2)
    std = (squares / (counts - 1).clamp(min=1)).sqrt()[index]
    return counts[index], mean, std


def group_advantages(scores: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, estimator: str,
                     eps: float = 1e-6) -> torch.Tensor:
    """Outcome advantages from the other samples of the same prompt, on every real token. [B], [B], [B, T] -> [B, T].

    grpo     (r_i - mean_g) / (std_g + eps)          Shao et al. 2024 (DeepSeekMath), std unbiased
    dr_grpo  r_i - mean_g                            Liu et al. 2025 (Dr. GRPO): no std division, which
                                                     up-weights prompts whose samples barely differ
    rloo     r_i - mean_{j != i} r_j = N/(N-1) (r_i - mean_g)   Ahmadian et al. 2024 (leave-one-out)

    A group whose samples all score the same gets 0 everywhere (nothing to learn from it).
    """
    size, mean, std = _group_stats(scores, groups, min_size=2)
    centered = scores.to(torch.float64) - mean
    if estimator == "grpo":  # an all-equal group has std 0 and centered 0: its advantage is 0, not 0/0
        advantage = torch.where(std > 0, centered / (std + eps), torch.zeros_like(centered))
    elif estimator == "dr_grpo":
        advantage = centered
    elif estimator == "rloo":
        advantage = centered * size / (size - 1)
    else:
        raise ValueError(f"{estimator!r} is not a group estimator; one of {sorted(GROUPED)}")
    return advantage.to(mask.dtype if mask.is_floating_point() else torch.float32).unsqueeze(1) * mask


def rewards_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s-t) r_s over real tokens (REINFORCE++'s return; Hu 2025). [B, T] -> [B, T]."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask
