"""The scoring API's answers over real HTTP on 127.0.0.1 (servers: tests/conftest.py): item shapes, per-item
errors, malformed requests, the model revision everywhere, batch invariance."""

from __future__ import annotations

import math
import re
import threading

import httpx
import pytest

from tests.api_helpers import ITEMS, UNICODE, error_code, metric, post, results, score

# ---------------------------------------------------------------------------------------------
# happy paths


def test_score_every_item_shape_matches_the_local_scorer(reward_server, tiny_reward_model):
    from reward_models.scoring import RewardScorer

    response = score(reward_server, ITEMS)
    got = results(response)
    assert [r["id"] for r in got] == [item["id"] for item in ITEMS]
    local = RewardScorer(tiny_reward_model, device="cpu").score([{k: v for k, v in i.items() if k != "id"} for i in ITEMS])
    for r, expected in zip(got, local):
        assert r["error"] is None and r["truncated"] is False
        assert r["tokens"] == expected["tokens"] > 0
        assert abs(r["reward"] - expected["reward"]) < 1e-5  # the API renders exactly as RM training and PPO do
        assert r["normalized_reward"] == pytest.approx((r["reward"] - 0.5) / 2.0)
    revision = response.json()["model_revision"]
    assert re.fullmatch(r"[0-9a-f]{12}", revision) and response.headers["X-Model-Revision"] == revision


def test_compare_gives_margin_and_probability(reward_server):
    prompt = [{"role": "user", "content": "Please cancel my camera order."}]
    good, bad = "I have cancelled your camera order.", "Read the manual."
    body = post(reward_server, "/v1/compare", {"prompt": prompt, "chosen": good, "rejected": bad}).json()
    alone = results(score(reward_server, [{"id": 0, "prompt": prompt, "response": good},
                                          {"id": 1, "prompt": prompt, "response": bad}]))
    assert body["chosen"]["reward"] == pytest.approx(alone[0]["reward"], abs=1e-5)
    assert body["rejected"]["reward"] == pytest.approx(alone[1]["reward"], abs=1e-5)
    assert body["margin"] == pytest.approx(body["chosen"]["reward"] - body["rejected"]["reward"])
    assert body["p_chosen"] == pytest.approx(1 / (1 + math.exp(-body["margin"])))
    as_messages = post(reward_server, "/v1/compare", {  # preference-data style: responses as message lists
        "prompt": "Please cancel my camera order.", "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}]}).json()
    assert as_messages["margin"] == pytest.approx(body["margin"], abs=1e-5)


def test_models_health_ready_and_docs(reward_server):
    models = httpx.get(f"{reward_server.url}/v1/models").json()
    model = models["models"][0]
    assert model["revision"] == models["model_revision"]
    assert model["max_length"] == 384  # what the RM was trained with (config.json), not the base model's 512
    assert (model["reward_mean"], model["reward_std"]) == (0.5, 2.0)
    assert "path" not in model and models["auth"] is False
    assert models["limits"]["max_items"] == 256 and models["limits"]["max_item_tokens"] == 384
    assert httpx.get(f"{reward_server.url}/healthz").json() == {"status": "ok", "model_revision": model["revision"]}
    assert httpx.get(f"{reward_server.url}/readyz").json()["status"] == "ready"
    schema = httpx.get(f"{reward_server.url}/openapi.json").json()
    assert {"/v1/score", "/v1/compare", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    shapes = schema["components"]["schemas"]["ScoreRequest"]["properties"]["items"]["items"]["oneOf"]
    assert {s["$ref"].rsplit("/", 1)[1] for s in shapes} == {"PromptItem", "MessagesItem", "TextItem"}
    assert "swagger" in httpx.get(f"{reward_server.url}/docs").text.lower()


def test_metrics_in_prometheus_text(reward_server):
    score(reward_server, ITEMS[:2])
    text = httpx.get(f"{reward_server.url}/metrics").text
    for series in ('rm_requests_total{endpoint="/v1/score",status="200"}', "rm_request_duration_seconds_bucket",
                   'rm_items_total{outcome="scored"}', "rm_batch_size_bucket", "rm_queue_depth", "rm_tokens_total",
                   "rm_padded_tokens_total", "rm_forward_duration_seconds_count", "rm_ready 1.0"):
        assert series in text, series
    assert metric(reward_server, 'rm_items_total{outcome="scored"}') >= 2


def test_unicode_is_scored(reward_server):
    items = [{"id": f"u{i}", "prompt": text, "response": text[::-1]} for i, text in enumerate(UNICODE)]
    items += [{"id": "中文-id-🚀", "text": UNICODE[0]}, {"id": "zh", "messages": [
        {"role": "user", "content": UNICODE[0]}, {"role": "assistant", "content": UNICODE[1]}]}]
    got = results(score(reward_server, items))
    assert [r["id"] for r in got] == [i["id"] for i in items]
    assert all(r["error"] is None and math.isfinite(r["reward"]) and r["tokens"] > 3 for r in got)


# ---------------------------------------------------------------------------------------------
# per-item errors: one bad item never fails the request


BAD_ITEMS = [
    ({"id": "e1", "text": ""}, "text"),
    ({"id": "e2", "prompt": "", "response": "x"}, "prompt"),
    ({"id": "e3", "messages": []}, "messages"),
    ({"id": "e4", "messages": [{"role": "user", "content": "no assistant turn"}]}, "assistant"),
    ({"id": "e5", "messages": [{"role": "assistant"}]}, "content"),
    ({"id": "e6", "messages": [{"role": "", "content": "x"}]}, "role"),
    ({"id": "e7", "messages": [{"role": "assistant", "content": 3}]}, "content"),
    ({"id": "e8", "messages": [{"role": "assistant", "content": "x", "extra": 1}]}, "extra"),
    ({"id": "e9", "messages": "not a list"}, "messages"),
    ({"id": "e10", "prompt": "p"}, "response"),
    ({"id": "e11", "text": "x", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"id": "e12", "what": "x"}, "an item is an object"),
    ({"text": "x"}, "id"),
    ({"id": True, "text": "x"}, "id"),
    ({"id": 1.5, "text": "x"}, "id"),
    ({"id": "e16", "text": 42}, "text"),
    ("not an object", "an item is an object"),
    (None, "an item is an object"),
    ([1, 2], "an item is an object"),
]


def test_bad_items_get_their_own_errors(reward_server):
    good = {"id": "ok", "prompt": "Where is my lamp?", "response": "I have sent you the tracking link for your lamp."}
    items = [good] + [item for item, _ in BAD_ITEMS] + [good]
    got = results(score(reward_server, items))
    assert len(got) == len(items)
    assert got[0]["error"] is None and got[-1]["error"] is None and got[0]["reward"] == got[-1]["reward"]
    for result, (item, hint) in zip(got[1:-1], BAD_ITEMS):
        assert result["reward"] is None and result["error"]["code"] == "invalid_item", (item, result)
        assert hint in result["error"]["message"], (item, result["error"])
        expected_id = item.get("id") if isinstance(item, dict) and type(item.get("id")) in (str, int) else None
        assert result["id"] == expected_id


def test_lone_surrogates_are_item_errors_not_crashes(reward_server):
    raw = '{"items": [{"id": "a\\ud800", "text": "x\\udfff"}, {"id": "b", "text": "fine"}]}'
    got = results(post(reward_server, "/v1/score", content=raw, headers={"Content-Type": "application/json"}))
    assert got[0]["error"]["code"] in ("render_failed", "invalid_item") and got[1]["error"] is None
    bad = post(reward_server, "/v1/compare", content='{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}',
               headers={"Content-Type": "application/json"})
    assert bad.status_code == 422


# ---------------------------------------------------------------------------------------------
# malformed requests: 422


@pytest.mark.parametrize("content", [
    b"{not json", b"", b"[]", b"null", b'"items"', b'{"items": {}}', b'{"items": "x"}', b'{"items": []}',
    b'{"truncate": true}', b'{"items": [{"id": 1, "text": "x"}], "truncate": "yes"}',
    b'{"items": [{"id": 1, "text": "x"}], "truncate": 1}', b'{"items": [{"id": 1, "text": "x"}], "extra": 1}',
    b'{"items": [{"id": 1, "text": "x"}]', b"\xff\xfe\x00garbage", '{"items": [{"id": 1, "text": "é"}]}'.encode("latin-1"),
])
def test_malformed_score_requests_are_422(reward_server, content):
    response = post(reward_server, "/v1/score", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid_request"
    assert response.json()["model_revision"] == response.headers["X-Model-Revision"]


@pytest.mark.parametrize("body", [
    {"prompt": "p", "chosen": "a"}, {"prompt": "", "chosen": "a", "rejected": "b"},
    {"prompt": [], "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": 1, "rejected": "b"},
    {"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "b"},
    {"prompt": "p", "chosen": "a", "rejected": "b", "truncate": "no"}, {"prompt": "p", "chosen": "a", "rejected": "b", "x": 1},
])
def test_malformed_compare_requests_are_422(reward_server, body):
    response = post(reward_server, "/v1/compare", body)
    assert response.status_code == 422 and error_code(response) == "invalid_request"


def test_wrong_method_and_unknown_path(reward_server):
    assert httpx.get(f"{reward_server.url}/v1/score").status_code == 405
    missing = httpx.get(f"{reward_server.url}/v2/nothing")
    assert missing.status_code == 404 and missing.headers["X-Model-Revision"]


# ---------------------------------------------------------------------------------------------
# revision everywhere, batch invariance, logs


def test_model_revision_in_every_response(reward_server):
    revision = httpx.get(f"{reward_server.url}/v1/models").json()["model_revision"]
    responses = [
        score(reward_server, ITEMS), post(reward_server, "/v1/compare", {"prompt": "p", "chosen": "a", "rejected": "b"}),
        httpx.get(f"{reward_server.url}/v1/models"), httpx.get(f"{reward_server.url}/healthz"),
        httpx.get(f"{reward_server.url}/readyz"), httpx.get(f"{reward_server.url}/metrics"),
        httpx.get(f"{reward_server.url}/openapi.json"), httpx.get(f"{reward_server.url}/nope"),
        post(reward_server, "/v1/score", content=b"{", headers={"Content-Type": "application/json"}),
        score(reward_server, [{"id": i, "text": "x"} for i in range(300)]),
    ]
    for response in responses:
        assert response.headers["X-Model-Revision"] == revision, response.request.url
        if response.headers["content-type"] == "application/json" and response.request.url.path != "/openapi.json":
            assert response.json()["model_revision"] == revision, response.request.url


def test_batch_invariance(reward_server):
    from rlhf.data.demo_task import DemoTaskConfig, sft_examples

    examples = sft_examples(DemoTaskConfig(seed=3), n=24)
    items = [{"id": i, "prompt": e["messages"][:-1], "response": e["messages"][-1]["content"] * (1 + i % 4)}
             for i, e in enumerate(examples)]
    alone = [results(score(reward_server, [item]))[0]["reward"] for item in items[:8]]
    batches_before = metric(reward_server, "rm_batch_size_count")
    together = [r["reward"] for r in results(score(reward_server, items))]
    assert metric(reward_server, "rm_batch_size_count") - batches_before < len(items)  # really batched
    concurrent = [None] * 8

    def one(i):
        concurrent[i] = results(score(reward_server, [items[i]]))[0]["reward"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert abs(alone[i] - together[i]) < 1e-5 and abs(alone[i] - concurrent[i]) < 1e-5
