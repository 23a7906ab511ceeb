"""The one way text becomes a reward: rendering (chat template, EOS, truncation side) and batched scoring.

Reward-model training (``reward_models.train``), PPO and the scoring API all call ``render_item`` /
``RewardScorer``, so the model is scored on exactly the tokens it was trained on (docs/design.md).

Rendering rules (how, with literal user text and bounded work: ``reward_models.rendering``):
- ``{prompt, response}``: the prompt (a string = one user turn, or messages) plus the response as an
  assistant turn, through the tokenizer's chat template (which closes the turn with its end token).
- ``{messages}``: the conversation through the chat template; it should end on an assistant turn.
  Message contents are plain text: a special-token string in one never becomes a special token.
- ``{text}``: raw text, already formatted (its special-token strings are parsed), with EOS appended when
  missing (as TRL does for non-conversational data).
- Over ``max_length`` tokens: rejected (``TooLong``), or with ``truncate=True`` cut from the *left*,
  so the end of the response -- where the reward is read -- survives.
The reward is read at the last non-pad token (the model's pad token is distinct from EOS).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .rendering import Rendered, TooLong, item_pieces, render_pieces

__all__ = ["Rendered", "RewardScorer", "TooLong", "as_messages", "pair_to_ids", "render_item", "save_reward_stats"]

REWARD_MEAN_KEY = "rlhf_reward_mean"
REWARD_STD_KEY = "rlhf_reward_std"
MAX_LENGTH_KEY = "rlhf_max_length"


def as_messages(item: dict) -> list[dict] | None:
    """The conversation an item stands for (None for raw ``text`` items)."""
    if "text" in item:
        return None
    if "messages" in item:
        return list(item["messages"])
    prompt = item["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return prompt + [{"role": "assistant", "content": item["response"]}]


def render_item(tokenizer, item: dict, max_length: int | None, truncate: bool = False, memo: dict | None = None) -> Rendered:
    """Token ids the reward model reads for one item (see the module docstring for the rules). ``memo``,
    shared between the items of one request, tokenizes a text they have in common (a prompt) once."""
    return render_pieces(tokenizer, item_pieces(tokenizer, item), max_length, truncate, memo)


def pair_to_ids(tokenizer, pair: dict, max_length: int | None) -> tuple[list[int], list[int], bool]:
    """(chosen ids, rejected ids, truncated) of a preference pair, rendered as for scoring."""
    chosen = render_item(tokenizer, {"messages": pair["prompt"] + pair["chosen"]}, max_length, truncate=True)
    rejected = render_item(tokenizer, {"messages": pair["prompt"] + pair["rejected"]}, max_length, truncate=True)
    return chosen.input_ids, rejected.input_ids, chosen.truncated or rejected.truncated


def model_revision(path: str) -> str:
    """A short content hash of a local model directory's weights and config (or the Hub revision)."""
    if not os.path.isdir(path):
        return path
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin", "config.json")):
            with open(os.path.join(path, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


def resolve_reward_model_path(model_path: str) -> str:
    """The directory (or Hub id) to load; a path that can only be local and is missing says so, instead of
    the Hub's "Repo id must be in the form 'repo_name'" (a Hub id is ``name`` or ``org/name``)."""
    from rlhf.models import resolve_model_path

    path = resolve_model_path(model_path)
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)):
        raise FileNotFoundError(f"{model_path}: no such model directory (train one with `rlhf reward`)")
    return path


class RewardScorer:
    """A sequence-classification reward model (``num_labels=1``) with its tokenizer and statistics.

    A checkpoint without the classification head (e.g. an SFT model) is refused: the head would be random,
    and every reward noise. ``allow_untrained_head=True`` loads it anyway (tests, benchmarks)."""

    def __init__(self, model_path: str, device: str | None = None, dtype: str = "float32", max_length: int | None = None,
                 allow_untrained_head: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhf.models import disable_dropout

        path = resolve_reward_model_path(model_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise FileNotFoundError(f"{model_path}: neither a local model directory nor a model on the Hub ({exc})") from None
        self.model, loading = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=getattr(torch, dtype), output_loading_info=True)
        prefix = self.model.base_model_prefix + "."
        head = sorted(k for k in loading["missing_keys"] if not k.startswith(prefix))
        if head and not allow_untrained_head:
            raise ValueError(f"{model_path} is not a reward model: its checkpoint has no score head ({', '.join(head)}); "
                             "it looks like a causal LM (e.g. the SFT stage's output). Train a reward model from it "
                             "(`rlhf reward`), or pass --allow-untrained-head to serve a random head anyway")
        disable_dropout(self.model)
        self.model.eval()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        config = self.model.config
        if config.pad_token_id is None or config.pad_token_id == self.tokenizer.eos_token_id:
            raise ValueError(f"{model_path}: reward model needs a pad token distinct from EOS (pad={config.pad_token_id})")
        # the length it was trained with first: scoring longer inputs than it ever saw is out of distribution
        self.max_length = (max_length or getattr(config, MAX_LENGTH_KEY, None)
                           or getattr(config, "max_position_embeddings", None) or 2048)
        self.mean = float(getattr(config, REWARD_MEAN_KEY, 0.0) or 0.0)
        self.std = float(getattr(config, REWARD_STD_KEY, 1.0) or 1.0)
        self.revision = model_revision(path)
        self.path = path

    def render(self, item: dict, truncate: bool = False) -> Rendered:
        return render_item(self.tokenizer, item, self.max_length, truncate)

    @torch.no_grad()
    def score_ids(self, batch: list[list[int]]) -> list[float]:
        """Raw rewards of already-rendered sequences, in one right-padded forward pass (fp32 output)."""
        if not batch:
            return []
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
        return logits[:, 0].float().cpu().tolist()

    def normalize(self, reward: float) -> float:
        return (reward - self.mean) / self.std

    def score(self, items: list[dict], truncate: bool = False, batch_size: int = 32) -> list[dict]:
        """Score items; each result holds reward, normalized reward, tokens read and truncation flag."""
        rendered = [self.render(item, truncate) for item in items]
        rewards = []
        for start in range(0, len(rendered), batch_size):
            rewards += self.score_ids([r.input_ids for r in rendered[start : start + batch_size]])
        return [
            {"reward": r, "normalized_reward": self.normalize(r), "tokens": x.n_tokens, "truncated": x.truncated}
            for r, x in zip(rewards, rendered)
        ]

    def info(self) -> dict:
        return {"revision": self.revision, "max_length": self.max_length, "reward_mean": self.mean,
                "reward_std": self.std, "path": self.path}


def save_reward_stats(model_dir: str, mean: float, std: float, max_length: int | None = None) -> None:
    """Store the training-reward statistics, and the max_length the RM was trained with, in the model's
    config.json (they travel with the model; the server scores at that length by default)."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config[REWARD_MEAN_KEY], config[REWARD_STD_KEY] = mean, std
    if max_length is not None:
        config[MAX_LENGTH_KEY] = max_length
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
