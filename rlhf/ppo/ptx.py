"""PPO-ptx (Ouyang et al. 2022): batches of SFT demonstrations whose loss is mixed into the PPO loss."""

from __future__ import annotations

import torch


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


def ptx_batch(tokenizer, examples, cfg, step: int, call: int, device):
    """A deterministic batch for (step, call): right-padded ids, attention mask and labels."""
    g = torch.Generator().manual_seed((cfg.seed * 7919 + step) * 104729 + call)
    rows = [examples[i] for i in torch.randint(len(examples), (cfg.ptx_batch_size,), generator=g).tolist()]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids.to(device), mask.to(device), labels.to(device)
