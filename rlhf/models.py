"""Loading models and tokenizers by Hub id or local path, and what every loaded model is normalized to.

``model_name_or_path`` may be a Hub id, a local directory, or ``tiny:demo`` (``rlhf.tiny_model``). Every
stage loads through here, so the quirks of real checkpoints are dealt with in one place: a pad token
distinct from EOS (docs/design.md, detail 1), dropout off (detail 3), partial freezing.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PAD_TOKEN = "<|pad|>"  # added to tokenizers without a pad token distinct from EOS


def resolve_model_path(name: str) -> str:
    """``tiny:demo`` -> the built tiny model's directory; a GGUF file -> its converted directory
    (``rlhf.model_import``); anything else (Hub id, path) unchanged."""
    if name == "tiny:demo":
        from .tiny_model import tiny_demo_path

        return tiny_demo_path()
    if name.startswith("tiny:"):
        raise ValueError(f"unknown tiny model {name!r}; the only built-in one is 'tiny:demo'")
    from .model_import import resolve_gguf

    converted = resolve_gguf(name)  # a .gguf file or gguf:<package>: a standard directory, made once
    if converted is not None:
        return converted
    return name


def ensure_pad_token(tokenizer, model=None) -> bool:
    """Give the tokenizer a pad token distinct from EOS (docs/design.md, detail 1: never pad = EOS).

    With pad = EOS the collator masks every EOS as padding, the policy never learns to stop, and a
    reward model reads the wrong token. Tokenizers without one get ``<|pad|>``. Returns whether a token
    was added; every model that reads this tokenizer's ids must then be ``fit_to_tokenizer``-ed.
    """
    added = False
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added = True
    if model is not None:
        fit_to_tokenizer(model, tokenizer)
    return added


def fit_to_tokenizer(model, tokenizer, label: str = "model") -> None:
    """Make ``model`` read ``tokenizer``'s ids: embeddings grown to hold an added pad token (never shrunk:
    checkpoints such as Qwen's ship more rows than their tokenizer has), pad ids in its configs."""
    weight = model.get_input_embeddings().weight
    rows = weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]  # ZeRO-3: the local shard is empty
    if tokenizer.pad_token_id >= rows:
        if len(tokenizer) - rows > 1:  # more than the pad token is missing: another tokenizer's model
            raise ValueError(f"{label} has {rows} token embeddings but the tokenizer has {len(tokenizer)} tokens: "
                             "it was trained with another tokenizer, and every model here must read the policy's ids")
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def end_of_turn_token(tokenizer) -> str:
    """The token the chat template closes an assistant turn with (``<|im_end|>`` for ChatML, ``<|end|>`` for the
    tiny model), falling back to EOS: where replies stop and where the reward model reads its score."""
    marker = "\x00reply\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:  # a template that refuses these roles: EOS is all we know
        return tokenizer.eos_token
    after = text[text.rindex(marker) + len(marker):] if marker in text else ""
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((t for t in specials if t and after.lstrip(" ").startswith(t)), tokenizer.eos_token)


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
    """A causal LM by Hub id or path, in eval mode (dropout off: docs/design.md, detail 3)."""
    torch_dtype = None if dtype in (None, "auto") else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path), dtype=torch_dtype or "auto", revision=revision, **kwargs
    )
    return model.eval()


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout makes logprobs of the same tokens differ between passes, which breaks PPO's ratio = 1.

    Setting the config is not enough: Llama, Mistral and Qwen copy ``attention_dropout`` into their attention
    modules at init, OPT copies ``dropout`` and ``layerdrop`` into its layers, GPT-2 builds ``nn.Dropout``
    modules. So every dropout module gets p = 0, every float attribute of a module whose name says drop
    becomes 0, and so does every such config field (for models built from the config later).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if "drop" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    configs = [config, *(getattr(config, k, None) for k in ("text_config", "decoder"))] if config is not None else []
    for cfg in (c for c in configs if c is not None and hasattr(c, "to_dict")):
        for name, value in cfg.to_dict().items():
            if "drop" in name and isinstance(value, float):
                setattr(cfg, name, 0.0)


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
