"""rlhf/generation.py, the one sampling path: stop-token truncation, prompt encoding, and sampling that
uses only what the config says (a checkpoint's generation_config is set aside); rlhf/tensors.py helpers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.generation import (
    Sampling,
    encode_prompts,
    first_true_index,
    generate_replies,
    stop_token_ids,
    truncate_after_stop,
)
from rlhf.models import load_tokenizer, resolve_model_path
from rlhf.ppo.masked import last_index
from rlhf.tensors import pad_rows, seeded_generator
from tests.ppo_math_helpers import _mask_from_lengths

PROMPTS = [[{"role": "user", "content": "Where is my lamp order?"}],
           [{"role": "user", "content": "Please refund the kettle."}]] * 4


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer("tiny:demo")
    return AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:demo")), tokenizer


PAD, EOS, EOT = 0, 2, 3


def test_truncate_after_stop_cases():
    responses = torch.tensor(
        [
            [5, 6, EOS, 7, 8, EOS],  # stop in the middle; second EOS after it is padded too
            [EOS, 5, 6, 7, 8, 9],  # stop at position 0: empty reply = just the stop token
            [5, 6, 7, 8, 9, EOS],  # stop at the last position
            [5, 6, 7, 8, 9, 10],  # no stop at all
            [5, EOT, 6, EOS, 7, 8],  # second stop id comes first
            [5, 6, 7, EOS, EOT, 9],  # adjacent stop ids: the first one wins
        ]
    )
    out, mask, has_stop = truncate_after_stop(responses, [EOS, EOT], PAD)
    expected_out = torch.tensor(
        [
            [5, 6, EOS, PAD, PAD, PAD],
            [EOS, PAD, PAD, PAD, PAD, PAD],
            [5, 6, 7, 8, 9, EOS],
            [5, 6, 7, 8, 9, 10],
            [5, EOT, PAD, PAD, PAD, PAD],
            [5, 6, 7, EOS, PAD, PAD],
        ]
    )
    expected_mask = _mask_from_lengths([3, 1, 6, 6, 2, 4], 6)
    assert torch.equal(out, expected_out)
    assert torch.equal(mask, expected_mask)
    assert has_stop.tolist() == [True, True, True, False, True, True]
    # the stop token itself is inside the mask, at the last real position
    for b in [0, 1, 2, 4, 5]:
        assert out[b, last_index(mask)[b]].item() in (EOS, EOT)
    # input not mutated
    assert responses[0, 5] == EOS


def test_truncate_after_stop_only_listed_ids_stop():
    responses = torch.tensor([[5, EOT, 6, EOS]])
    out, mask, has_stop = truncate_after_stop(responses, [EOS], PAD)
    assert torch.equal(out, responses)
    assert mask.tolist() == [[1, 1, 1, 1]]
    assert has_stop.tolist() == [True]
    out, mask, has_stop = truncate_after_stop(responses, [], PAD)
    assert torch.equal(out, responses) and mask.all() and has_stop.tolist() == [False]


def test_truncate_after_stop_pad_id_is_used_and_dtypes():
    responses = torch.tensor([[1, 9, 1, 1]])
    out, mask, has_stop = truncate_after_stop(responses, [9], pad_id=-100)
    assert out.tolist() == [[1, 9, -100, -100]]
    assert out.dtype == responses.dtype
    assert mask.dtype == torch.long
    assert has_stop.dtype == torch.bool


def test_first_true_index():
    bools = torch.tensor(
        [
            [False, True, False, True],
            [True, False, False, False],
            [False, False, False, True],
            [False, False, False, False],
        ]
    )
    assert first_true_index(bools).tolist() == [1, 0, 3, 4]


def test_pad_rows_left_and_right():
    ids, mask = pad_rows([[1, 2, 3], [4]], pad_value=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_rows([[1, 2, 3], [4]], pad_value=-100, width=5)
    assert ids.tolist() == [[1, 2, 3, -100, -100], [4, -100, -100, -100, -100]] and mask.sum().item() == 4
    ids, mask = pad_rows([[]], pad_value=7, width=1)  # an empty row still gets a column
    assert ids.tolist() == [[7]] and mask.tolist() == [[0]]


def test_seeded_generators_depend_on_the_keys_only():
    a = torch.randperm(50, generator=seeded_generator(0, "minibatches", 3, 1))
    torch.randperm(50, generator=seeded_generator(0, "minibatches", 3, 0))  # drawing elsewhere changes nothing
    assert torch.equal(a, torch.randperm(50, generator=seeded_generator(0, "minibatches", 3, 1)))
    assert not torch.equal(a, torch.randperm(50, generator=seeded_generator(0, "minibatches", 3, 2)))
    # (seed, step) = (1, 0) and (0, 100003) collided under the old seed * prime + step formula
    assert not torch.equal(torch.randperm(50, generator=seeded_generator(1, 0)),
                           torch.randperm(50, generator=seeded_generator(0, 100003)))


def test_stop_tokens_must_be_in_the_vocabulary(tiny):
    _, tokenizer = tiny
    assert stop_token_ids(tokenizer) == (tokenizer.eos_token_id,)
    assert stop_token_ids(tokenizer, ["<|end|>", "<|user|>"]) == tuple(tokenizer.convert_tokens_to_ids(["<|end|>", "<|user|>"]))
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        stop_token_ids(tokenizer, ["</s>"])


def test_sampling_ignores_the_checkpoints_generation_config(tiny, caplog):
    model, tokenizer = tiny
    sampling = Sampling(max_new_tokens=12, temperature=1.0, stop_token_ids=stop_token_ids(tokenizer))
    clean = generate_replies(model, tokenizer, PROMPTS, sampling, seed=5)
    model.generation_config.repetition_penalty = 1.3  # what real checkpoints ship
    model.generation_config.no_repeat_ngram_size = 2
    try:
        with caplog.at_level("WARNING", logger="rlhf.generation"):
            penalised = generate_replies(model, tokenizer, PROMPTS, sampling, seed=5)
    finally:
        model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = None, None
    assert penalised.token_ids == clean.token_ids  # the same distribution was sampled
    assert "repetition_penalty" in caplog.text and "ignoring" in caplog.text


def test_replies_end_at_the_first_stop_token_and_greedy_is_deterministic(tiny):
    model, tokenizer = tiny
    stops = stop_token_ids(tokenizer, ["<|end|>", "<|user|>"])
    gens = generate_replies(model, tokenizer, PROMPTS, Sampling(10, 1.0, stop_token_ids=stops), seed=1)
    for ids, stopped in zip(gens.token_ids, gens.has_stop):
        assert stopped == (ids[-1] in stops) and not set(ids[:-1]) & set(stops)
        assert len(ids) <= 10
    greedy = Sampling(10, temperature=0, stop_token_ids=stops)
    once = generate_replies(model, tokenizer, PROMPTS, greedy, seed=1)
    assert generate_replies(model, tokenizer, PROMPTS, greedy, seed=2).token_ids == once.token_ids
    top1 = dataclasses.replace(greedy, temperature=1.0, top_k=1)  # top-k is honoured: k=1 is greedy
    assert generate_replies(model, tokenizer, PROMPTS, top1, seed=3).token_ids == once.token_ids


def test_generation_leaves_the_global_rng_alone(tiny):
    model, tokenizer = tiny
    state = torch.random.get_rng_state()
    generate_replies(model, tokenizer, PROMPTS[:2], Sampling(4, stop_token_ids=stop_token_ids(tokenizer)), seed=9)
    assert torch.equal(state, torch.random.get_rng_state())


def test_encode_prompts_left_pads_and_cuts_from_the_left(tiny):
    _, tokenizer = tiny
    ids, mask, cut = encode_prompts(tokenizer, PROMPTS[:2] + [[{"role": "user", "content": "please " * 100}]], 16, "cpu")
    assert cut == 1 and ids.shape[1] == 16 and (mask[:, -1] == 1).all() and (mask[0, 0] == 0)
    assert ids[2, -1] == tokenizer.convert_tokens_to_ids("<|assistant|>")  # the generation prompt survives
