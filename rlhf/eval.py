"""Generation on held-out prompts and the figures a stage is judged by (gold reward, EOS rate, length)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generations:
    prompts: list[list[dict]]
    responses: list[str]
    ended_with_eos: list[bool]
    lengths: list[int]  # generated tokens, EOS included
    token_ids: list[list[int]]  # the sampled ids up to and including EOS (re-encoding the text may differ)


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
) -> Generations:
    """Sample a reply to each prompt (left-padded batches; temperature 0 means greedy)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    eos_id = tokenizer.eos_token_id
    responses, eos_flags, lengths, token_ids = [], [], [], []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=1.0,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                n = row.index(eos_id) + 1 if eos_id in row else len([t for t in row if t != tokenizer.pad_token_id])
                responses.append(tokenizer.decode(row[: n - (eos_id in row)], skip_special_tokens=True))
                eos_flags.append(eos_id in row)
                lengths.append(n)
                token_ids.append(row[:n])
    finally:
        tokenizer.padding_side = old_side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return Generations(list(prompts), responses, eos_flags, lengths, token_ids)


def gold_summary(gens: Generations, gold_fn) -> dict:
    """Mean gold reward, EOS rate and mean length of a set of generations."""
    scores = [gold_fn(p, r) for p, r in zip(gens.prompts, gens.responses)]
    n = max(1, len(scores))
    return {
        "gold_reward": sum(scores) / n,
        "eos_rate": sum(gens.ended_with_eos) / n,
        "response_length": sum(gens.lengths) / n,
        "n": len(scores),
    }
