"""PPO math, pure torch: tensors and masks in, tensors out (no models, no Accelerator, no I/O).

Shapes: B = batch of sequences, T = response length (tokens after the prompt). A ``mask`` is 1 on
real response tokens -- up to and including the stop token -- and 0 on the padding after it.

Sources: OpenAI lm-human-preferences; Huang et al. 2024, "The N+ Implementation Details of RLHF with
PPO"; Schulman 2020, "Approximating KL divergence" (k1/k3); Schulman et al. 2016 (GAE).
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) over ``dim`` (all dims when None); inf/NaN under a 0 mask do not leak in."""
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) / sum(mask); 0 where the mask is empty (an all-padding row never yields NaN)."""
    total = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / total.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of x (Bessel-corrected when ``unbiased`` and n > 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if unbiased and n > 1 else var


def whiten(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) on the mask, 0 elsewhere; mean/var are given so they can be global.

    ``shift_mean=False`` keeps the mean (used for rewards: whitening must not change their sign).
    """
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def first_true_index(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, or its length when there is none. [B, T] -> [B]."""
    length = bools.shape[-1]
    positions = torch.arange(length, device=bools.device).expand_as(bools)
    return torch.where(bools, positions, torch.full_like(positions, length)).min(-1).values


def truncate_after_stop(responses: torch.Tensor, stop_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut every response after its first stop token. [B, T] -> (responses, mask, has_stop).

    The stop token itself is kept and is part of the mask (it is an action the policy takes and where
    the reward model reads the score); everything after it becomes ``pad_id`` with mask 0.
    """
    is_stop = torch.zeros_like(responses, dtype=torch.bool)
    for stop in stop_ids:
        is_stop |= responses == stop
    first = first_true_index(is_stop)  # T when absent
    positions = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
    mask = positions <= first.unsqueeze(1)
    return responses.masked_fill(~mask, pad_id), mask.long(), first < responses.shape[1]


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy. [B, T] -> [B, T].

    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, always >= 0).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (0 for an all-padding row). [B, T] -> [B]."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(-1).values


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


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-e, 1+e)), r = exp(logp - logp_old).

    Returns the loss and statistics: clipfrac, approxkl = mean 0.5 (log r)^2, ratio mean and variance.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask, unbiased=False),
            "ratio_max_dev": ((ratio - 1).abs() * mask).max() if mask.any() else torch.zeros(()),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range_value: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position. [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), in fp32. [B, T, V], [B, T] -> [B, T].

    Dividing by the sampling temperature makes these the log-probabilities of the distribution the
    tokens were actually sampled from (DESIGN detail 4).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)
