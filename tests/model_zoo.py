"""A zoo of tiny random checkpoints with the quirks of the architectures users bring, built offline.

Each is a standard ``save_pretrained`` directory with a chat-templated tokenizer (the demo tokenizer, so
prompts are shared), small enough that a few PPO steps take seconds:

- ``llama-untied``: untied input/output embeddings, no pad token, attention_dropout 0.1 (a float the
  attention modules copy), and a generation_config that sets repetition_penalty 1.3 and
  no_repeat_ngram_size 3 (sampling must ignore both);
- ``qwen2``: attention biases and a 151,936-token embedding (larger than the tokenizer, as Qwen ships);
- ``gpt2``: no pad token at all, dropout 0.1 everywhere (attn/resid/embd_pdrop as nn.Dropout modules);
- ``opt``: dropout and attention_dropout 0.1 copied into modules as floats, layerdrop 0.1;
- ``mistral``: grouped-query attention, a sliding window, attention_dropout 0.1 (a float in modules);
- ``pad-is-eos``: a Llama whose tokenizer's pad token is its EOS (what SmolLM2 and many chat models ship).
"""

from __future__ import annotations

import os

from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhf.data.demo_task import DemoTaskConfig, corpus
from rlhf.tiny_model import EOS_TOKEN, build_tiny_tokenizer

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             max_position_embeddings=256)
ZOO = ("llama-untied", "qwen2", "gpt2", "opt", "mistral", "pad-is-eos")


def build(name: str, out: str) -> str:
    """Write checkpoint ``name`` (one of ZOO) to ``out`` and return it."""
    pad = {"gpt2": None, "llama-untied": None, "pad-is-eos": EOS_TOKEN}.get(name, "<|pad|>")
    tok = build_tiny_tokenizer(corpus(DemoTaskConfig(seed=0)), 1024, pad_token=pad)
    ids = dict(bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    n = len(tok)
    if name in ("llama-untied", "pad-is-eos"):
        untied = name == "llama-untied"
        model = LlamaForCausalLM(LlamaConfig(vocab_size=n, tie_word_embeddings=not untied,
                                             attention_dropout=0.1 if untied else 0.0, **SMALL, **ids))
    elif name == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151_936, tie_word_embeddings=True, **SMALL, **ids))
    elif name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=n, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                           resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, **ids))
    elif name == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=n, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=256, word_embed_proj_dim=32,
                                         dropout=0.1, attention_dropout=0.1, layerdrop=0.1, **ids))
    elif name == "mistral":
        model = MistralForCausalLM(MistralConfig(vocab_size=n, sliding_window=64, attention_dropout=0.1,
                                                 **{**SMALL, "num_key_value_heads": 1}, **ids))
    else:
        raise ValueError(f"unknown zoo model {name!r}; one of {ZOO}")
    generation = GenerationConfig(**ids)
    if name == "llama-untied":
        generation.repetition_penalty, generation.no_repeat_ngram_size = 1.3, 3
    model.generation_config = generation
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
