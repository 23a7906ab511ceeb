"""Loading policies and tokenizers by Hub id or local path, and the tiny-model factory for offline runs.

``model_name_or_path`` may be a Hub id, a local directory, or ``tiny:demo``: a tokenizer trained on
the demo task's corpus and a small Llama built from scratch, saved with ``save_pretrained`` under
``$RLHF_HOME`` (default ``~/.cache/rlhf``) so every stage loads it like any Hub model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .cache import rlhf_home

PAD_TOKEN = "<|pad|>"
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


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 1024):
    """Byte-level BPE trained on ``texts``: lossless for any Unicode, with a pad token distinct from EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [PAD_TOKEN, EOS_TOKEN, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
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


def resolve_model_path(name: str) -> str:
    """``tiny:demo`` -> the built tiny model's directory; anything else (Hub id, path) unchanged."""
    if name == "tiny:demo":
        return tiny_demo_path()
    if name.startswith("tiny:"):
        raise ValueError(f"unknown tiny model {name!r}; the only built-in one is 'tiny:demo'")
    return name


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give the tokenizer a pad token distinct from EOS (DESIGN: never pad = EOS).

    With pad = EOS the collator masks every EOS as padding, the policy never learns to stop, and a
    reward model reads the wrong token. Tokenizers without one get ``<|pad|>`` (embeddings resized).
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if model is not None:
        if tokenizer.pad_token_id >= model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(name_or_path), revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{name_or_path}: the tokenizer has no chat template; use a chat model, or set "
            "`chat_template_path` to a tokenizer or .jinja file that has one"
        )
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str | None = None, revision: str | None = None, **kwargs):
    """A causal LM by Hub id or path, in eval mode (dropout off: DESIGN detail 3)."""
    torch_dtype = None if dtype in (None, "auto") else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path), dtype=torch_dtype or "auto", revision=revision, **kwargs
    )
    return model.eval()


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout makes logprobs of the same tokens differ between passes, which breaks PPO's ratio = 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def freeze_lower_layers(model, freeze_layers: int = 0, train_top_layers: int | None = None) -> tuple[int, int]:
    """Partial fine-tuning: freeze the embeddings and the lower N layers (or all but the top K).

    Returns (trainable, total) parameter counts.
    """
    layers = _decoder_layers(model)
    n = len(layers)
    if train_top_layers is not None:
        if not 0 < train_top_layers <= n:
            raise ValueError(f"train_top_layers must be in 1..{n}, got {train_top_layers}")
        freeze_layers = n - train_top_layers
    if not 0 <= freeze_layers < n:
        raise ValueError(f"freeze_layers must be in 0..{n - 1} (the model has {n} layers), got {freeze_layers}")
    if freeze_layers:
        model.get_input_embeddings().requires_grad_(False)
        for layer in layers[:freeze_layers]:
            layer.requires_grad_(False)
        if getattr(model.config, "tie_word_embeddings", False):
            # tied input/output embeddings cannot be frozen on one side only; keep the head trainable
            model.get_input_embeddings().requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _decoder_layers(model):
    base = getattr(model, "model", model)
    for attr in ("layers", "h", "blocks", "decoder.layers"):
        obj = base
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} for partial fine-tuning")
