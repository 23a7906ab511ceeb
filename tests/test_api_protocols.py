"""The protocol adapters over real HTTP: OpenRLHF's remote reward model (/get_reward) and vLLM's
classification API (/classify, as veRL's reward loop calls it). Each must give the rewards the native
/v1/score gives for the same text, through the same limits and auth."""

from __future__ import annotations

import math

import httpx
import pytest

from tests.api_helpers import AUTH, error_code, post, results, score

CONVERSATIONS = [
    [{"role": "user", "content": "Where is my laptop order?"}, {"role": "assistant", "content": "I have sent the link."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Refund my kettle."},
     {"role": "assistant", "content": "Done: a full refund."}],
    [{"role": "user", "content": "你好 🎧"}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def queries(tiny_reward_model):
    """What OpenRLHF sends: the policy's whole decoded sequence (here: the same template), EOS included."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]


def native(server, queries, headers=None):
    return results(score(server, [{"id": i, "text": q} for i, q in enumerate(queries)], headers=headers))


def test_openrlhf_get_reward(reward_server, queries):
    # exactly what openrlhf/utils/agent.py posts (_fetch_rewards_via_http)
    body = {"query": queries, "prompts": ["p0", "p1", "p2"], "labels": [None, "gold", None]}
    got = post(reward_server, "/get_reward", body)
    assert got.status_code == 200, got.text
    answer = got.json()
    expected = native(reward_server, queries)
    assert answer["rewards"] == pytest.approx([r["normalized_reward"] for r in expected], abs=1e-5)
    assert answer["scores"] == answer["rewards"]  # OpenRLHF reads `scores`, falling back to `rewards`
    assert answer["extra_logs"]["raw_reward"] == pytest.approx([r["reward"] for r in expected], abs=1e-5)
    # a query over the model's length is cut from the left, never refused (OpenRLHF's server truncates too)
    long = post(reward_server, "/get_reward", {"query": ["refund " * 2000 + queries[0]]}).json()["rewards"]
    assert len(long) == 1 and math.isfinite(long[0])
    assert post(reward_server, "/get_reward", {"query": queries[0]}).status_code == 422  # a list, not a string
    assert post(reward_server, "/get_reward", {"query": []}).status_code == 422


def test_openrlhf_get_reward_goes_through_auth_and_limits(auth_reward_server, queries):
    server = auth_reward_server  # a key, at most 4 items and 300 tokens per request
    assert post(server, "/get_reward", {"query": queries}).status_code == 401
    assert post(server, "/get_reward", {"query": queries}, headers=AUTH).status_code == 200
    too_many = post(server, "/get_reward", {"query": queries * 2}, headers=AUTH)
    assert too_many.status_code == 413 and error_code(too_many) == "too_many_items"
    too_long = post(server, "/get_reward", {"query": ["refund " * 200] * 4}, headers=AUTH)  # 4 x 96 > 300 tokens
    assert too_long.status_code == 413 and error_code(too_long) == "too_many_tokens"


def test_vllm_classify_as_verl_calls_it(reward_server, queries):
    expected = native(reward_server, queries)
    # veRL's reward loop (verl/experimental/reward_loop/reward_loop.py): one input, activation off,
    # `model` is its config's path, score = data[-1]["probs"][-1]
    for query, want in zip(queries, expected):
        body = {"model": "/checkpoints/my-rm", "input": query, "activation": False}
        got = post(reward_server, "/classify", body).json()
        assert got["data"][-1]["probs"][-1] == pytest.approx(want["reward"], abs=1e-5)
        assert got["object"] == "list" and got["data"][0]["num_classes"] == 1 and got["data"][0]["label"]
        assert got["usage"]["prompt_tokens"] == want["tokens"] and got["id"].startswith("classify-")
    batch = post(reward_server, "/classify", {"input": queries, "use_activation": False}).json()["data"]
    assert [d["index"] for d in batch] == [0, 1, 2]
    assert [d["probs"][0] for d in batch] == pytest.approx([r["reward"] for r in expected], abs=1e-5)
    activated = post(reward_server, "/classify", {"input": queries[0]}).json()["data"][0]["probs"][0]
    assert activated == pytest.approx(1 / (1 + math.exp(-expected[0]["reward"])), abs=1e-6)  # vLLM's default


def test_vllm_classify_messages_token_ids_and_truncation(reward_server, queries, tiny_reward_model):
    from transformers import AutoTokenizer

    from reward_models.scoring import render_item

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    want = results(score(reward_server, [{"id": 0, "messages": CONVERSATIONS[1]}]))[0]["reward"]
    chat = post(reward_server, "/classify", {"messages": CONVERSATIONS[1], "use_activation": False}).json()
    assert chat["data"][0]["probs"][0] == pytest.approx(want, abs=1e-5)
    ids = render_item(tokenizer, {"messages": CONVERSATIONS[1]}, None).input_ids
    by_ids = post(reward_server, "/classify", {"input": [ids, ids], "use_activation": False}).json()
    assert [d["probs"][0] for d in by_ids["data"]] == pytest.approx([want, want], abs=1e-5)
    long = "refund " * 2000 + queries[0]
    refused = post(reward_server, "/classify", {"input": long})
    assert refused.status_code == 422 and error_code(refused) == "too_long"  # vLLM refuses it too
    cut = post(reward_server, "/classify", {"input": long, "truncate_prompt_tokens": -1}).json()
    assert cut["usage"]["prompt_tokens"] == 384
    for bad in ({"input": "x", "truncation_side": "right"}, {"input": "x", "messages": CONVERSATIONS[0]}, {},
                {"input": [10**9]}, {"messages": [{"role": "system|><|assistant", "content": "x"}]}):
        assert post(reward_server, "/classify", bad).status_code == 422, bad


def test_protocols_are_in_the_openapi_document(reward_server):
    paths = httpx.get(f"{reward_server.url}/openapi.json").json()["paths"]
    assert {"/get_reward", "/classify"} <= set(paths)
