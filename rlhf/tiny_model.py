"""The tiny model for offline runs (``model_name_or_path: tiny:demo``): built from scratch, cached.

A byte-level BPE tokenizer trained on the demo task's corpus (pad ``<|pad|>`` distinct from EOS
``<|end|>``) and a small Llama, saved with ``save_pretrained`` under ``$RLHF_HOME`` (default
``~/.cache/rlhf``), so every stage loads it like any Hub model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .models import PAD_TOKEN
from .paths import rlhf_home

EOS_TOKEN = "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# {% generation %} marks what the assistant says, *including* its end-of-turn token, so SFT with
# assistant-only loss teaches the model to stop (TRL checks this with is_chat_template_stop_token_trained).
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}{% generation %}{{- message['content'] + '<|end|>' -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


@dataclass
class TinyModelSpec:
    """Size of the scratch Llama; defaults train the demo task on 2 CPU cores in well under a minute."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    vocab_size: int = 1024  # upper bound for the BPE trainer; the real size is what it learns
    seed: int = 0


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 1024, pad_token: str | None = PAD_TOKEN):
    """Byte-level BPE trained on ``texts``: lossless for any Unicode, with a pad token distinct from EOS.

    ``pad_token=None`` (no pad, as GPT-2 ships) or ``EOS_TOKEN`` (pad = EOS, as many chat models ship)
    build the quirks real checkpoints bring, for tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [PAD_TOKEN, EOS_TOKEN, *ROLE_TOKENS] if pad_token == PAD_TOKEN else [EOS_TOKEN, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad_token, eos_token=EOS_TOKEN,
        additional_special_tokens=ROLE_TOKENS, padding_side="right",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, spec: TinyModelSpec) -> LlamaForCausalLM:
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def tiny_demo_path(spec: TinyModelSpec | None = None) -> str:
    """Build (once) and return the directory of the tiny demo base model."""
    from .data.demo_task import DemoTaskConfig, corpus

    spec = spec or TinyModelSpec()
    key = hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(rlhf_home(), f"tiny-demo-{key}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = build_tiny_tokenizer(corpus(DemoTaskConfig(seed=spec.seed)), spec.vocab_size)
    model = build_tiny_model(tokenizer, spec)
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, path)  # atomic: a concurrent builder of the same key loses the race harmlessly
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path
