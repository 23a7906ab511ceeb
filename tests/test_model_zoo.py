"""The quirks of real checkpoints, one tiny checkpoint each (tests/model_zoo.py): dropout copied into modules,
no pad token or pad = EOS, untied embeddings, a vocabulary larger than the tokenizer, a generation_config
with a repetition penalty. Every one trains a few PPO steps in every topology with the ratio check passing."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf.models import disable_dropout, ensure_pad_token, load_tokenizer
from tests.conftest import accelerate_launch
from tests.model_zoo import ZOO, build
from tests.ppo_support import PPO_YAML, PROMPTS, make_config, ok, small, trainer_for


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {name: build(name, str(root / name)) for name in ZOO}


@pytest.mark.parametrize("name", ZOO)
def test_dropout_is_off_in_every_module_after_disable_dropout(zoo, name):
    model = AutoModelForCausalLM.from_pretrained(zoo[name])
    tokenizer = AutoTokenizer.from_pretrained(zoo[name])
    ensure_pad_token(tokenizer, model)
    ids = tokenizer(["Where is my lamp order? Please tell me."] * 2, return_tensors="pt")["input_ids"]
    disable_dropout(model)
    model.train()  # PPO's update forward runs in train mode
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["gpt2", "llama-untied", "pad-is-eos"])
def test_a_dedicated_pad_token_grows_every_model_alike(zoo, name):
    tokenizer = load_tokenizer(zoo[name])
    rows = AutoModelForCausalLM.from_pretrained(zoo[name]).get_input_embeddings().weight.shape[0]
    assert ensure_pad_token(tokenizer) and tokenizer.pad_token_id != tokenizer.eos_token_id
    from rlhf.ppo.actor_critic import build_actor_critic

    for topology in ("separate", "shared", "lora"):
        cfg = make_config(zoo[name], f"model_name_or_path={zoo[name]}", f"topology={topology}")
        model, ref = build_actor_critic(cfg, tokenizer)
        for m in [model.generation_model(), *([ref] if ref is not None else []),
                  *([model.critic] if topology == "separate" else [])]:
            assert m.get_input_embeddings().weight.shape[0] == rows + 1 == len(tokenizer)
            assert m.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("topology", ["separate", "shared", "lora"])
@pytest.mark.parametrize("name", ZOO)
def test_a_few_ppo_steps_in_every_topology_pass_the_ratio_check(zoo, tmp_path, name, topology):
    cfg = make_config(tmp_path, f"model_name_or_path={zoo[name]}", f"topology={topology}", max_new_tokens=8,
                      batch_size=4, num_minibatches=2)
    history = trainer_for(cfg).train()  # the first-minibatch ratio check runs in every step
    assert len(history) == 2 and all(math.isfinite(v) for m in history for v in m.values())


def test_a_penalised_checkpoint_without_a_pad_token_trains_through_accelerate_launch(zoo, tmp_path):
    out = tmp_path / "run"
    log = ok(accelerate_launch("ppo.py", "--config", PPO_YAML, f"output_dir={out}",
                               *small(f"model_name_or_path={zoo['llama-untied']}", "ratio_check_tolerance=1e-5")))
    assert "ignoring the checkpoint's generation_config settings" in log and "repetition_penalty" in log
    policy = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == "<|pad|>" and policy.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert AutoModelForSequenceClassification.from_pretrained(out / "critic").config.pad_token_id == tokenizer.pad_token_id
    assert policy.generation_config.repetition_penalty == 1.3  # the checkpoint keeps its settings for users


def test_prompts_encode_for_every_architecture(zoo):
    from rlhf.generation import encode_prompts

    for name in ZOO:
        tokenizer = load_tokenizer(zoo[name])
        ensure_pad_token(tokenizer)
        ids, mask, _ = encode_prompts(tokenizer, PROMPTS, 64, "cpu")
        assert (mask[:, -1] == 1).all() and ids.shape == mask.shape
