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
