"""PPO-ptx (Ouyang et al. 2022): batches of SFT demonstrations whose loss is mixed into the PPO loss."""

from __future__ import annotations

import torch

from ..tensors import pad_rows


def tokenize_demonstrations(tokenizer, conversations: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per conversation; labels are -100 outside assistant turns (as in SFT)."""
    out = []
    for record in conversations:
        enc = tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, keep = enc["input_ids"][:max_length], enc["assistant_masks"][:max_length]
        if any(keep):
            out.append((ids, [t if k else -100 for t, k in zip(ids, keep)]))
    if not out:
        raise ValueError("ptx_dataset has no assistant tokens within max_prompt_length + max_new_tokens")
    return out


def ptx_batch(tokenizer, examples, batch_size: int, generator: torch.Generator, device):
    """A batch drawn with ``generator``: right-padded ids, attention mask and labels (-100 on padding)."""
    rows = [examples[i] for i in torch.randint(len(examples), (batch_size,), generator=generator).tolist()]
    ids, mask = pad_rows([r for r, _ in rows], tokenizer.pad_token_id, device=device)
    labels, _ = pad_rows([lab for _, lab in rows], -100, device=device)
    return ids, mask, labels
