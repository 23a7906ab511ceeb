"""The tiny-model factory and model loading helpers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from trl.chat_template_utils import is_chat_template_stop_token_trained

from rlhf.models import (
    PAD_TOKEN,
    disable_dropout,
    ensure_pad_token,
    freeze_lower_layers,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from rlhf.tiny_model import EOS_TOKEN

PROMPT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Where is my lamp order?"}]
REPLY = "I am sorry about that. I have sent you the tracking link for your lamp."


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model_path("tiny:demo")
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def test_tiny_model_loads_like_any_hub_model(tiny):
    path, tokenizer, model = tiny
    assert resolve_model_path("tiny:demo") == path  # built once, then reused
    assert model.config.model_type == "llama"
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    with pytest.raises(ValueError, match="only built-in one"):
        resolve_model_path("tiny:huge")


def test_chat_template_trains_the_stop_token_and_matches_prompt_plus_response(tiny):
    _, tokenizer, _ = tiny
    assert is_chat_template_stop_token_trained(tokenizer)
    full = tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": REPLY}], tokenize=False)
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert full == prompt + REPLY + EOS_TOKEN
    # token level: prompt tokens + response tokens == tokens of the whole conversation (PPO relies on it)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    parts = tokenizer(prompt, add_special_tokens=False)["input_ids"] + tokenizer(REPLY + EOS_TOKEN, add_special_tokens=False)["input_ids"]
    assert ids == parts and ids[-1] == tokenizer.eos_token_id
    out = tokenizer.apply_chat_template(
        PROMPT + [{"role": "assistant", "content": REPLY}], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == REPLY + EOS_TOKEN


@pytest.mark.parametrize("text", ["我的订单在哪里？", "naïve “quotes” — ok", "emoji 🙂 and tabs\tand\nnewlines"])
def test_tokenizer_round_trips_any_unicode(tiny, text):
    _, tokenizer, _ = tiny
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_load_helpers_accept_the_tiny_name_and_turn_dropout_off(tiny):
    model = load_causal_lm("tiny:demo")
    assert not model.training
    assert load_tokenizer("tiny:demo").chat_template


def test_ensure_pad_token_adds_a_distinct_pad_and_resizes():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = GPT2LMHeadModel(config)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny:demo"))
    tokenizer.pad_token = tokenizer.eos_token  # the classic mistake
    ensure_pad_token(tokenizer, model)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] > tokenizer.pad_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert config.resid_pdrop == 0.0


def test_freeze_lower_layers_counts_and_validates(tiny):
    model = load_causal_lm("tiny:demo")
    n_layers = model.config.num_hidden_layers
    total = sum(p.numel() for p in model.parameters())
    trainable, counted = freeze_lower_layers(model, freeze_layers=1)
    layer0 = sum(p.numel() for p in model.model.layers[0].parameters())
    assert counted == total and trainable == total - layer0
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert all(p.requires_grad for p in model.model.layers[-1].parameters())
    model = load_causal_lm("tiny:demo")
    trainable_top, _ = freeze_lower_layers(model, train_top_layers=1)
    assert trainable_top == trainable if n_layers == 2 else trainable_top < trainable
    with pytest.raises(ValueError, match="freeze_layers must be in"):
        freeze_lower_layers(load_causal_lm("tiny:demo"), freeze_layers=n_layers)
    with pytest.raises(ValueError, match="train_top_layers must be in"):
        freeze_lower_layers(load_causal_lm("tiny:demo"), train_top_layers=0)
