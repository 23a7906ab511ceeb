"""Log-probabilities, entropy and the clipped PPO losses, pure torch (docs/design.md, details 4, 5, 10)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masked import masked_mean, masked_sum, masked_var

# temporaries of at most this many float32 bytes per chunk: a [B, T, 151936] vocabulary in fp32 is gigabytes
CHUNK_BYTES = 64 << 20


def _chunks(logits: torch.Tensor):
    rows = logits.reshape(-1, logits.shape[-1])
    step = max(1, CHUNK_BYTES // (4 * logits.shape[-1]))
    return rows, range(0, rows.shape[0], step), step


def _logprob_rows(rows: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = rows.float() / temperature
    return scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def _entropy_rows(rows: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(rows.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _by_chunks(fn, logits: torch.Tensor, *extra) -> torch.Tensor:
    """``fn`` over row chunks of [..., V], so at most one chunk of full-vocabulary fp32 temporaries exists;
    under autograd each chunk is recomputed in the backward pass instead of kept."""
    from torch.utils.checkpoint import checkpoint

    rows, starts, step = _chunks(logits)
    flat = [e.reshape(-1) for e in extra]
    grad = torch.is_grad_enabled() and logits.requires_grad
    out = [checkpoint(fn, rows[i : i + step], *(f[i : i + step] for f in flat), use_reentrant=False) if grad
           else fn(rows[i : i + step], *(f[i : i + step] for f in flat)) for i in starts]
    return torch.cat(out).reshape(logits.shape[:-1])


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), in fp32. [B, T, V], [B, T] -> [B, T].

    Dividing by the sampling temperature makes these the log-probabilities of the distribution the
    tokens were actually sampled from (docs/design.md, detail 4). Computed as the picked logit minus the
    log-sum-exp, chunk by chunk (``_by_chunks``): never a full fp32 copy of a large vocabulary.
    """
    return _by_chunks(lambda rows, toks: _logprob_rows(rows, toks, temperature), logits, tokens)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position. [..., V] -> [...], chunk by chunk."""
    return _by_chunks(_entropy_rows, logits)


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class Normalizer:
    """What a micro-batch's summed loss is divided by, so that micro-batches and processes add up to one
    minibatch-wide mean whatever the split: the minibatch's real tokens and sequences over all processes,
    divided by how many micro-batch losses the backward averages (accumulation steps x processes)."""

    tokens: float
    sequences: float
    max_tokens: float = 1.0  # the reply budget, for seq-mean-token-sum-norm


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
                   norm: Normalizer | None = None) -> torch.Tensor:
    """A per-token loss [B, T] -> a scalar, as veRL names the modes:

    token-mean           sum_{i,t} l_it / N_tokens (every token weighs the same; long replies weigh more)
    seq-mean-token-sum   sum_i (sum_t l_it) / N_seqs
    seq-mean-token-mean  sum_i (mean_t l_it) / N_seqs (every reply weighs the same)
    seq-mean-token-sum-norm  sum_{i,t} l_it / (N_seqs * max_tokens): Dr. GRPO's fix for the length bias of
                         per-reply means (a constant divisor: long wrong replies are not excused)

    Without ``norm`` the counts are this batch's own (a plain masked mean for token-mean).
    """
    norm = norm or Normalizer(float(mask.sum().clamp(min=1)), float(mask.shape[0]), float(mask.shape[1]))
    if mode == "token-mean":
        return masked_sum(per_token, mask) / norm.tokens
    per_sequence = masked_sum(per_token, mask, dim=1)
    if mode == "seq-mean-token-mean":
        per_sequence = per_sequence / mask.sum(1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        per_sequence = per_sequence / norm.max_tokens
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss_agg_mode {mode!r}; use one of {LOSS_AGG_MODES}")
    return per_sequence.sum() / norm.sequences


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float, clip_range_high: float | None = None,
                mode: str = "token-mean", norm: Normalizer | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: max(-A r, -A clip(r, 1 - e_low, 1 + e_high)) per token, r = exp(logp - logp_old),
    aggregated by ``mode``. e_high defaults to e_low; a larger one is DAPO's clip-higher (Yu et al. 2025).

    Returns the loss and statistics: clipfrac, approxkl = mean 0.5 (log r)^2, ratio mean and variance,
    and the largest |r - 1| (the first-minibatch ratio check reads it).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, mode, norm)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask, unbiased=False),
            "ratio_max_dev": ((ratio - 1).abs() * mask).max() if mask.any() else torch.zeros(()),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range_value: float, mode: str = "token-mean",
               norm: Normalizer | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_old + clip(V - V_old) - R)^2) per token, aggregated by ``mode``."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped_error, clipped_error), mask, mode, norm)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats
