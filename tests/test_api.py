"""The scoring API over real HTTP on 127.0.0.1, against servers started as subprocesses (tests/conftest.py).

Servers: ``reward_server`` (defaults, no key), ``auth_reward_server`` (a key and small limits),
``queue_reward_server`` (a one-item queue whose batcher holds each item 1.5 s: deterministic 429s).
The batcher's pure planning and its asyncio behaviour are also tested in-process at the end.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward_models.batching import MicroBatcher, QueueFull, pass_overhead, plan_batches
from tests.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
UNICODE = ["你好，我的笔记本电脑在哪里？", "👩‍💻🚀🎉 emoji", "مرحبا بالعالم", "e\u0301\u200b\u2028 combining", "tab\tnul\x00"]


def post(server, path: str, body=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kwargs) if body is not None else \
        httpx.post(f"{server.url}{path}", timeout=60, **kwargs)


def score(server, items: list, truncate: bool | None = None, **kwargs) -> httpx.Response:
    body = {"items": items} if truncate is None else {"items": items, "truncate": truncate}
    return post(server, "/v1/score", body, **kwargs)


def results(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["results"]


def metric(server, name: str, headers=None) -> float:
    """Sum of a Prometheus series' samples matching ``name`` (a prefix with optional labels)."""
    text = httpx.get(f"{server.url}/metrics", headers=headers).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


ITEMS = [
    {"id": "s", "prompt": "Where is my laptop order?", "response": "I have sent you the tracking link for your laptop."},
    {"id": 2, "prompt": [{"role": "system", "content": "You are a helpful support agent."},
                         {"role": "user", "content": "Please refund the kettle."}], "response": "I have issued a full refund."},
    {"id": "m", "messages": [{"role": "user", "content": "I want a refund"}, {"role": "assistant", "content": "Which item?"},
                             {"role": "user", "content": "It is the lamp."},
                             {"role": "assistant", "content": "I am sorry about that. I have issued a full refund for your lamp."}]},
    {"id": "t", "text": "<|user|>Hi<|end|><|assistant|>Hello<|end|>"},
    {"id": 5, "prompt": "Cancel my phone order.", "response": ""},  # an empty response is scored, not refused
]


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
    assert model["revision"] == models["model_revision"] and model["max_length"] == 512
    assert (model["reward_mean"], model["reward_std"]) == (0.5, 2.0)
    assert "path" not in model and models["auth"] is False
    assert models["limits"]["max_items"] == 256 and models["limits"]["max_item_tokens"] == 512
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
# limits: 413 for sizes, per-item errors for length, left truncation on request


def test_huge_inputs(reward_server):
    huge = "tracking link " * 80_000  # ~1.1 MB, hundreds of thousands of tokens
    got = results(score(reward_server, [{"id": "h", "text": huge}, {"id": "s", "text": "short"}]))
    assert got[0]["error"]["code"] == "too_long" and got[0]["tokens"] > 100_000 and got[1]["error"] is None
    cut = results(score(reward_server, [{"id": "h", "text": huge}], truncate=True))[0]
    assert cut["error"] is None and cut["truncated"] is True and cut["tokens"] > 100_000
    over = post(reward_server, "/v1/score", content=b'{"items": [{"id": 1, "text": "' + b"x" * (5 << 20) + b'"}]}',
                headers={"Content-Type": "application/json"})
    assert over.status_code == 413 and error_code(over) == "body_too_large"
    many = score(reward_server, [{"id": i, "text": "x"} for i in range(257)])
    assert many.status_code == 413 and error_code(many) == "too_many_items"
    assert len(results(score(reward_server, [{"id": i, "text": "x"} for i in range(256)]))) == 256


def test_size_limits_are_413(auth_reward_server):
    server = auth_reward_server  # max 4 items, 20000 bytes, 300 tokens per request, 96 per item
    big = post(server, "/v1/score", {"items": [{"id": 1, "text": "x" * 30_000}]}, headers=AUTH)
    assert big.status_code == 413 and error_code(big) == "body_too_large"

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(10):
            yield b"x" * 5000

    streamed = httpx.post(f"{server.url}/v1/score", content=chunks(), headers=AUTH)
    assert streamed.status_code == 413
    assert error_code(score(server, [{"id": i, "text": "x"} for i in range(5)], headers=AUTH)) == "too_many_items"
    long_item = {"id": 0, "text": "refund " * 85}  # ~90 tokens each: 4 of them are over 300
    tokens = score(server, [long_item] * 4, headers=AUTH)
    assert tokens.status_code == 413 and error_code(tokens) == "too_many_tokens"
    assert len(results(score(server, [long_item] * 3, headers=AUTH))) == 3


def test_over_length_items_are_rejected_or_cut_from_the_left(auth_reward_server, tiny_reward_model):
    from reward_models.scoring import RewardScorer, render_item

    server, tail = auth_reward_server, " ".join(["I have issued a full refund for your lamp."] * 20)
    items = [{"id": "a", "prompt": "Where is my laptop?", "response": tail},
             {"id": "b", "prompt": "Please cancel my chair order, thank you.", "response": tail},
             {"id": "short", "text": "ok"}]
    rejected = results(score(server, items, headers=AUTH))
    assert [r["error"]["code"] if r["error"] else None for r in rejected] == ["too_long", "too_long", None]
    assert rejected[0]["tokens"] > 96 and "96" in rejected[0]["error"]["message"]
    cut = results(score(server, items, truncate=True, headers=AUTH))
    assert all(r["error"] is None for r in cut) and [r["truncated"] for r in cut] == [True, True, False]
    # the prompts differ only in what the left cut removed, so the rewards are the same
    assert abs(cut[0]["reward"] - cut[1]["reward"]) < 1e-5
    scorer = RewardScorer(tiny_reward_model, device="cpu")
    ids = render_item(scorer.tokenizer, {k: v for k, v in items[0].items() if k != "id"}, 96, truncate=True).input_ids
    assert len(ids) == 96 and abs(scorer.score_ids([ids])[0] - cut[0]["reward"]) < 1e-5
    body = {"prompt": "Where is my laptop?", "chosen": tail, "rejected": "ok"}
    too_long = post(server, "/v1/compare", body, headers=AUTH)
    assert too_long.status_code == 422 and error_code(too_long) == "too_long" and "chosen" in too_long.text
    truncated = post(server, "/v1/compare", {**body, "truncate": True}, headers=AUTH).json()
    assert truncated["chosen"]["truncated"] is True and truncated["rejected"]["truncated"] is False


def test_full_queue_is_429_with_retry_after(queue_reward_server):
    server = queue_reward_server
    held = {}
    thread = threading.Thread(target=lambda: held.update(r=score(server, [{"id": 1, "text": "first"}])))
    thread.start()
    deadline = time.monotonic() + 10
    while metric(server, "rm_queue_depth") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    refused = score(server, [{"id": 2, "text": "second"}])
    assert refused.status_code == 429 and error_code(refused) == "queue_full"
    assert refused.headers["Retry-After"].isdigit() and int(refused.headers["Retry-After"]) >= 1
    thread.join()
    assert results(held["r"])[0]["error"] is None


# ---------------------------------------------------------------------------------------------
# auth


def test_auth(auth_reward_server):
    server, body = auth_reward_server, {"items": [{"id": 1, "text": "x"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": API_KEY}, {"Authorization": f"Bearer {API_KEY}x"}):
        response = post(server, "/v1/score", body, headers=headers)
        assert response.status_code == 401 and error_code(response) == "unauthorized", headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert results(post(server, "/v1/score", body, headers=AUTH))[0]["error"] is None
    assert results(post(server, "/v1/score", body, headers={"Authorization": f"bearer {API_KEY}"}))  # scheme: any case
    # auth comes before the body is read: no key, no parsing (and no 422 telling what is wrong with it)
    assert post(server, "/v1/score", content=b"{broken", headers={"Content-Type": "application/json"}).status_code == 401
    for path in ("/v1/models", "/metrics", "/nothing-here"):
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
    assert httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["auth"] is True
    assert "rm_requests_total" in httpx.get(f"{server.url}/metrics", headers=AUTH).text
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):  # probes and docs stay open
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert API_KEY not in open(f"/proc/{server.proc.pid}/cmdline").read()  # the key never is a flag


def test_api_key_is_never_a_flag():
    from reward_models.serve import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--api-key", "secret"])
    assert parse_args(["--model", "m"]).host == "127.0.0.1"


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


def test_no_request_text_in_logs(reward_server, auth_reward_server):
    marker = "SECRET-7d1f-秘密"
    for server, headers in ((reward_server, {}), (auth_reward_server, AUTH), (auth_reward_server, {})):
        score(server, [{"id": 1, "prompt": marker, "response": marker}, {"id": 2, "text": marker * 200},
                       {"id": 3, "messages": [{"role": marker, "content": marker}]}, {"id": marker, "text": ""}],
              headers=headers)
        post(server, "/v1/compare", {"prompt": marker, "chosen": marker, "rejected": marker * 300}, headers=headers)
        post(server, "/v1/score", content=f'{{"items": [{{"id": 1, "text": "{marker}"'.encode(),
             headers={"Content-Type": "application/json", **headers})
        httpx.get(f"{server.url}/v1/{marker}?q={marker}", headers={"User-Agent": "SECRET-agent", **headers})
        httpx.get(f"{server.url}/v1/models", headers={"X-Request-ID": "SECRET id with spaces", **headers})
    time.sleep(0.2)
    for server in (reward_server, auth_reward_server):
        logs = server.logs()
        assert marker not in logs and "SECRET" not in logs
        assert re.search(r"POST /v1/score (200|401) items=", logs)  # the requests were logged, without their text
    # a well-formed client request id is echoed (and logged) for correlation
    echoed = httpx.get(f"{reward_server.url}/healthz", headers={"X-Request-ID": "req-42_a"})
    assert echoed.headers["X-Request-ID"] == "req-42_a"


# ---------------------------------------------------------------------------------------------
# start-up: /readyz before the model is warm, a model that fails to load, the loopback warning


def test_readyz_is_503_until_the_model_is_loaded(tiny_reward_model):
    import socket

    import uvicorn

    from reward_models.api import Limits, create_app
    from reward_models.scoring import RewardScorer

    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return RewardScorer(tiny_reward_model, device="cpu")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(slow_loader, Limits()), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        assert httpx.get(f"{url}/healthz").status_code == 200
        loading = httpx.get(f"{url}/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = httpx.post(f"{url}/v1/score", json={"items": [{"id": 1, "text": "x"}]})
        assert early.status_code == 503 and error_code(early) == "not_ready" and early.headers["Retry-After"]
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(f"{url}/v1/score", json={"items": [{"id": 1, "text": "x"}]}).status_code == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)


def test_a_model_that_fails_to_load_stops_the_server_and_non_loopback_warns(tmp_path, monkeypatch, caplog, capsys):
    from reward_models.serve import main

    monkeypatch.delenv("RLHF_API_KEY", raising=False)
    with caplog.at_level("INFO"):
        code = main(["--model", str(tmp_path), "--host", "0.0.0.0", "--port", "0"])  # an empty directory
    assert code == 1
    assert "without an API key" in caplog.text and "model load failed" in caplog.text
    assert re.search(r"serving on http://0\.0\.0\.0:\d+", capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------
# the batcher, in-process


@pytest.mark.parametrize("lengths,budget,cap", [([5, 1, 3, 2, 4], 8, 10), ([10] * 7, 30, 2), ([100, 1, 1], 50, 8), ([], 8, 4)])
def test_plan_batches_respects_budget_and_covers_every_item(lengths, budget, cap):
    batches = plan_batches(lengths, budget, cap)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= cap
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget
    order = [lengths[i] for b in batches for i in b]
    assert order == sorted(order)  # shortest first: similar lengths share a batch, little padding


def plan_cost(lengths, batches, overhead):
    return sum(overhead + len(b) * max(lengths[i] for i in b) for b in batches)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(1, 60), max_size=8), overhead=st.floats(0, 200), cap=st.integers(1, 5),
       budget=st.integers(1, 240))
def test_planned_batches_cost_no_more_than_any_other_cut(lengths, overhead, cap, budget):
    batches = plan_batches(lengths, budget, cap, overhead)
    if not lengths:
        assert batches == []
        return
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= cap and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget) for b in batches)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = math.inf
    for mask in range(2 ** (len(order) - 1)):  # every way to cut the sorted items into runs
        cuts = [0] + [k + 1 for k in range(len(order) - 1) if mask >> k & 1] + [len(order)]
        runs = [order[a:b] for a, b in zip(cuts, cuts[1:])]
        if all(len(r) <= cap and (len(r) == 1 or len(r) * max(lengths[i] for i in r) <= budget) for r in runs):
            best = min(best, plan_cost(lengths, runs, overhead))
    assert plan_cost(lengths, batches, overhead) <= best + 1e-6


def test_pass_overhead_from_two_timings():
    a, b = 1e-3, 2e-5  # 1 ms per pass, 20 us per padded token: a pass costs as much as 50 tokens
    assert pass_overhead((16, 1024), (a + 16 * b, a + 1024 * b)) == pytest.approx(50)
    assert pass_overhead((16, 1024), (1e-3, 1e-3)) is None  # padding is free: fill batches
    assert pass_overhead((16, 1024), (16 * b, 1024 * b)) == 16.0  # never below the floor


def _run(coro):
    return asyncio.run(coro)


def test_batcher_answers_each_future_and_refuses_when_full():
    calls = []

    def fn(batch):
        calls.append(len(batch))
        return [float(sum(ids)) for ids in batch]

    async def go():
        batcher = MicroBatcher(fn, max_batch_tokens=12, max_batch_items=4, max_wait_s=0.05, max_queue=6,
                               wait_policy="always")
        await batcher.start()
        futures = batcher.submit([[1], [2, 2], [3, 3, 3]]) + batcher.submit([[4] * 4, [5]])
        with pytest.raises(QueueFull) as refused:
            batcher.submit([[6], [7]])  # 5 waiting + 2 > 6: all or nothing
        assert refused.value.retry_after >= 1 and batcher.depth == 5
        values = await asyncio.gather(*futures)
        await batcher.close()
        return values

    assert _run(go()) == [1.0, 4.0, 9.0, 16.0, 5.0]
    assert sum(calls) == 5 and max(calls) <= 4 and len(calls) < 5


def test_batcher_survives_a_failing_forward_and_skips_abandoned_items():
    seen = []

    def fn(batch):
        seen.extend(batch)
        if [0] in batch:
            raise RuntimeError("boom")
        return [1.0] * len(batch)

    async def go():
        batcher = MicroBatcher(fn, max_batch_items=1, max_wait_s=0.001)
        await batcher.start()
        with pytest.raises(RuntimeError):
            await batcher.submit([[0]])[0]
        abandoned = batcher.submit([[7]])[0]
        abandoned.cancel()  # e.g. a request that timed out before its item reached the model
        value = await batcher.submit([[1]])[0]
        await batcher.close()
        return value

    assert _run(go()) == 1.0 and [7] not in seen


def test_closing_fails_every_waiting_future():
    release = threading.Event()

    async def go():
        batcher = MicroBatcher(lambda b: release.wait(10) and [0.0] * len(b), max_batch_items=1, max_wait_s=0.001)
        await batcher.start()
        futures = batcher.submit([[1], [2]]) + batcher.submit([[3]])  # one running, two waiting
        await asyncio.sleep(0.05)
        await batcher.close()
        release.set()
        return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = _run(go())
    assert all(isinstance(o, RuntimeError | asyncio.CancelledError) for o in outcomes), outcomes


def test_adaptive_wait_does_not_delay_a_sequential_client():
    async def go(policy):
        batcher = MicroBatcher(lambda b: [0.0] * len(b), max_wait_s=0.2, wait_policy=policy)
        await batcher.start()
        start = time.perf_counter()
        for _ in range(3):
            await batcher.submit([[1]])[0]
            await asyncio.sleep(0.25)  # a client that thinks between requests
        await batcher.close()
        return time.perf_counter() - start - 0.75

    assert _run(go("adaptive")) < 0.15
    assert _run(go("always")) >= 0.55


def test_limits_are_validated():
    from reward_models.api import Limits

    with pytest.raises(ValueError, match="max_queue"):
        Limits(max_items=10, max_queue=5)
    with pytest.raises(ValueError, match="positive"):
        Limits(max_body_bytes=0)
    assert json.loads(json.dumps(Limits().__dict__))["api_key_env"] == "RLHF_API_KEY"
