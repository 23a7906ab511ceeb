"""Rollouts: prompts -> sampled responses -> logprobs, reference logprobs, values and scores.

Shapes: B sequences on this process, Lq the (left-padded) prompt width, T the response width.
Prompts are left-padded so every response starts at column Lq, and position ids come from the
attention mask, so padding never shifts positions (DESIGN detail 2).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .math import entropy_from_logits, logprobs_from_logits, truncate_after_stop


@dataclass
class Rollout:
    query_ids: torch.Tensor  # [B, Lq] left-padded prompt tokens
    query_mask: torch.Tensor  # [B, Lq]
    response_ids: torch.Tensor  # [B, T] pad after the stop token
    response_mask: torch.Tensor  # [B, T] 1 up to and including the stop token
    has_stop: torch.Tensor  # [B] bool
    logprobs: torch.Tensor  # [B, T] policy at sampling time (temperature-scaled)
    ref_logprobs: torch.Tensor  # [B, T]
    values: torch.Tensor  # [B, T]
    scores: torch.Tensor  # [B] reward-model (or function) scores, after penalties and normalisation
    raw_scores: torch.Tensor  # [B] as the reward source returned them
    prompts: list  # B prompt conversations
    responses: list  # B response texts (up to the stop token)

    def select(self, index: torch.Tensor) -> Rollout:
        """A sub-batch (minibatch) with the same widths, so its forward pass matches the rollout's."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value[index] if isinstance(value, torch.Tensor) else [value[i] for i in index.tolist()]
        return Rollout(**out)


def encode_prompts(tokenizer, prompts: list[list[dict]], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chat-templated prompts, left-padded and cut from the left to ``max_length``; returns (ids, mask, n_cut)."""
    rows = [tokenizer(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)["input_ids"] for p in prompts]
    cut = sum(len(r) > max_length for r in rows)
    rows = [r[-max_length:] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device), cut


def position_ids_from(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over real tokens; padding gets 0 (it is masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def forward_response(model_fn, query_ids, query_mask, response_ids, response_mask, temperature: float,
                     with_values: bool = True, with_entropy: bool = False):
    """Run ``model_fn`` over prompt+response; return logprobs [B, T] (and values, entropy [B, T]).

    ``model_fn(input_ids, attention_mask, position_ids, logits_to_keep)`` returns logits or (logits,
    values). The logits at column Lq-1+t predict response token t, and the value there is that of the
    state before it. Only the last T+1 columns of logits are computed: over a real vocabulary the
    prompt's logits would dominate time and memory for nothing.
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    start, width = query_ids.shape[1] - 1, response_ids.shape[1]
    out = model_fn(input_ids, attention_mask, position_ids_from(attention_mask), width + 1)
    logits, values = out if with_values else (out, None)
    logits = logits[:, -(width + 1) : -1]
    logprobs = logprobs_from_logits(logits, response_ids, temperature)
    entropy = None
    if with_entropy:  # a statistic unless the entropy bonus is on: keep it out of the graph then
        source = logits if with_entropy == "grad" else logits.detach()
        entropy = entropy_from_logits(source.float() / temperature)
    if values is not None:
        values = values[:, start : start + width].float()
    return logprobs, values, entropy


@torch.no_grad()
def sample_responses(model, tokenizer, query_ids, query_mask, cfg, stop_ids: list[int]):
    """Sample responses and cut them after the first stop token: (ids [B, T], mask [B, T], has_stop [B])."""
    out = model.generate(
        input_ids=query_ids, attention_mask=query_mask, max_new_tokens=cfg.max_new_tokens, do_sample=True,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    responses = out[:, query_ids.shape[1]:]
    return truncate_after_stop(responses, stop_ids, tokenizer.pad_token_id)


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Response texts without padding and special tokens (the reward source gets plain text)."""
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(response_ids.cpu(), response_mask.cpu())]
