"""Log-probabilities, entropy and the clipped PPO losses, pure torch (docs/design.md, details 4, 5, 10)."""

from __future__ import annotations

import torch

from .masked import masked_mean, masked_var


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), in fp32. [B, T, V], [B, T] -> [B, T].

    Dividing by the sampling temperature makes these the log-probabilities of the distribution the
    tokens were actually sampled from (docs/design.md, detail 4).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position. [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-e, 1+e)), r = exp(logp - logp_old).

    Returns the loss and statistics: clipfrac, approxkl = mean 0.5 (log r)^2, ratio mean and variance,
    and the largest |r - 1| (the first-minibatch ratio check reads it).
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
