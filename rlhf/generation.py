"""The one generation path: chat-templated prompts -> sampled replies, cut after the first stop token.

PPO rollouts, PPO's held-out evaluation, SFT's sample table and ``rlhf eval`` all sample through
``generate`` / ``generate_replies``, so they honour the same settings: temperature (0 = greedy), top-p,
top-k, max new tokens and stop tokens. Sampling uses only those settings: a checkpoint's own
``generation_config`` (repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids, ...) is
set aside while generating, so what is sampled is softmax(logits / temperature) after top-p/top-k --
the distribution PPO's logprobs assume (docs/design.md, detail 4).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .tensors import pad_rows

log = logging.getLogger(__name__)

# generation_config fields that change the sampled distribution or length; what a checkpoint sets among
# them is ignored (and said once)
DISTRIBUTION_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "encoder_repetition_penalty", "min_length",
                       "min_new_tokens", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                       "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "typical_p", "epsilon_cutoff",
                       "eta_cutoff", "min_p", "top_h", "renormalize_logits", "exponential_decay_length_penalty")
_warned: set[int] = set()


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 48
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()  # replies end at the first of these (required)


@dataclass
class Generations:
    prompts: list[list[dict]]
    responses: list[str]  # decoded up to the stop token, special tokens dropped
    has_stop: list[bool]
    token_ids: list[list[int]]  # the sampled ids up to and including the stop token (re-encoding may differ)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]


def stop_token_ids(tokenizer, stop_tokens: list[str] | None = None) -> tuple[int, ...]:
    """Ids of ``stop_tokens``; by default the chat template's end-of-turn token (and EOS, when it is another
    token). A token the vocabulary lacks is an error, not a stop that silently never happens."""
    from .models import end_of_turn_token

    tokens = list(stop_tokens or dict.fromkeys([end_of_turn_token(tokenizer), tokenizer.eos_token]))
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(f"stop token(s) {missing} are not in the tokenizer's vocabulary; a stop token must be one "
                         f"token, e.g. the chat template's end-of-turn token {tokenizer.eos_token!r}")
    return tuple(vocab[t] for t in tokens)


def first_true_index(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, or its length when there is none. [B, T] -> [B]."""
    length = bools.shape[-1]
    positions = torch.arange(length, device=bools.device).expand_as(bools)
    return torch.where(bools, positions, torch.full_like(positions, length)).min(-1).values


def truncate_after_stop(responses: torch.Tensor, stop_ids, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut every response after its first stop token. [B, T] -> (responses, mask, has_stop).

    The stop token itself is kept and is part of the mask (it is an action the policy takes and where
    the reward model reads the score); everything after it becomes ``pad_id`` with mask 0.
    """
    is_stop = torch.isin(responses, torch.tensor(list(stop_ids), dtype=responses.dtype, device=responses.device))
    first = first_true_index(is_stop)  # T when absent
    positions = torch.arange(responses.shape[1], device=responses.device).expand_as(responses)
    mask = positions <= first.unsqueeze(1)
    return responses.masked_fill(~mask, pad_id), mask.long(), first < responses.shape[1]


def encode_prompts(tokenizer, prompts: list[list[dict]], max_length: int | None, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chat-templated prompts, left-padded and cut from the left to ``max_length``: (ids, mask, n_cut).

    Left padding puts every reply's first token in the same column, and position ids come from the mask
    (docs/design.md, detail 2).
    """
    rows = [tokenizer(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)["input_ids"] for p in prompts]
    cut = sum(len(r) > max_length for r in rows) if max_length else 0
    rows = [r[-max_length:] for r in rows] if max_length else rows
    ids, mask = pad_rows(rows, tokenizer.pad_token_id, side="left", device=device)
    return ids, mask, cut


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Reply texts without padding and special tokens (reward sources get plain text)."""
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(response_ids.cpu(), response_mask.cpu())]


@contextmanager
def _checkpoint_defaults_set_aside(model):
    """Generate with the library's defaults, not the checkpoint's generation_config (see the module doc)."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(inner, "generation_config", None)
    if saved is None:
        yield
        return
    ignored = {k: v for k, v in saved.to_diff_dict().items() if k in DISTRIBUTION_FIELDS and v not in (None, 1.0, 0, [])}
    if ignored and id(saved) not in _warned:
        _warned.add(id(saved))
        log.warning("ignoring the checkpoint's generation_config settings %s: sampling uses only temperature, top_p, "
                    "top_k, max_new_tokens and the stop tokens of the config", ignored)
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def generate(model, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: Sampling,
             pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample replies to left-padded prompts: (ids [B, T], mask [B, T], has_stop [B]), cut after the stop."""
    if not sampling.stop_token_ids:
        raise ValueError("Sampling.stop_token_ids is empty: replies would never end (see stop_token_ids())")
    greedy = sampling.temperature == 0
    settings = dict(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens,
                    eos_token_id=list(sampling.stop_token_ids), pad_token_id=pad_id, use_cache=True)
    if not greedy:
        settings.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    with _checkpoint_defaults_set_aside(model):
        out = model.generate(input_ids=query_ids, attention_mask=query_mask, **settings)
    return truncate_after_stop(out[:, query_ids.shape[1]:], sampling.stop_token_ids, pad_id)


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[list[dict]], sampling: Sampling, batch_size: int = 32,
                     seed: int | None = 0, max_prompt_length: int | None = None,
                     progress: str | None = None) -> Generations:
    """A reply to each prompt in batches, reproducibly for a given ``seed`` (the global RNG is left as it was);
    ``progress`` names a tqdm bar over the batches (none by default: training loops print their own)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses, has_stop, token_ids = [], [], []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            for start in tqdm(range(0, len(prompts), batch_size), desc=progress, disable=progress is None,
                              unit="batch"):
                q_ids, q_mask, _ = encode_prompts(tokenizer, prompts[start : start + batch_size], max_prompt_length,
                                                  device)
                ids, mask, stop = generate(model, q_ids, q_mask, sampling, tokenizer.pad_token_id)
                responses += decode_responses(tokenizer, ids, mask)
                has_stop += stop.tolist()
                token_ids += [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    finally:
        model.train(was_training)
    return Generations(list(prompts), responses, has_stop, token_ids)
