"""A PPO rollout batch, and the training-side forward that turns its tokens into logprobs and values.

Shapes: B sequences on this process, Lq the (left-padded) prompt width, T the response width. Prompts
are left-padded so every response starts at column Lq, and position ids come from the attention mask,
so padding never shifts positions (docs/design.md, detail 2). Sampling itself is ``rlhf.generation``;
the logprobs PPO uses are always recomputed here by the training model (detail 4), whatever sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .losses import entropy_from_logits, logprobs_from_logits


@dataclass
class Rollout:
    query_ids: torch.Tensor  # [B, Lq] left-padded prompt tokens
    query_mask: torch.Tensor  # [B, Lq]
    response_ids: torch.Tensor  # [B, T] pad after the stop token
    response_mask: torch.Tensor  # [B, T] 1 up to and including the stop token
    has_stop: torch.Tensor  # [B] bool
    prompts: list  # B prompt conversations
    responses: list  # B response texts (up to the stop token)
    groups: torch.Tensor | None = None  # [B] the prompt each reply answers (samples_per_prompt rows each)
    columns: list | None = None  # B dicts: the prompt records' extra dataset fields (reward functions get them)
    # filled in by the step: the policy at sampling time (temperature-scaled), the reference, the critic
    logprobs: torch.Tensor | None = None  # [B, T]
    ref_logprobs: torch.Tensor | None = None  # [B, T]
    values: torch.Tensor | None = None  # [B, T]
    raw_scores: torch.Tensor | None = None  # [B] as the reward source returned them
    scores: torch.Tensor | None = None  # [B] after the missing-stop penalty

    def select(self, index: torch.Tensor) -> Rollout:
        """A sub-batch (minibatch) with the same widths, so its forward pass matches the rollout's."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[index.to(value.device)]
            elif isinstance(value, list):
                value = [value[i] for i in index.tolist()]
            out[f.name] = value
        return Rollout(**out)


def position_ids_from(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over real tokens; padding gets 0 (it is masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def forward_response(model_fn, query_ids, query_mask, response_ids, response_mask, temperature: float,
                     with_values: bool = True, with_entropy: bool | str = False):
    """Run ``model_fn`` over prompt+response; return logprobs [B, T] (and values, entropy [B, T]).

    ``model_fn(input_ids, attention_mask, position_ids, logits_to_keep)`` returns logits or (logits,
    values). The logits at column Lq-1+t predict response token t, and the value there is that of the
    state before it. Only the last T+1 columns of logits are computed: over a real vocabulary the
    prompt's logits would dominate time and memory for nothing. ``with_entropy="grad"`` keeps the
    entropy in the graph (entropy bonus); ``True`` computes it as a detached statistic.
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    start, width = query_ids.shape[1] - 1, response_ids.shape[1]
    out = model_fn(input_ids, attention_mask, position_ids_from(attention_mask), width + 1)
    logits, values = out if with_values else (out, None)
    logits = logits[:, -(width + 1) : -1]
    logprobs = logprobs_from_logits(logits, response_ids, temperature)
    entropy = None
    if with_entropy:
        source = logits if with_entropy == "grad" else logits.detach()
        entropy = entropy_from_logits(source.float() / temperature)
    if values is not None:
        values = values[:, start : start + width].float()
    return logprobs, values, entropy
