"""Start-up and failure: /readyz before the model is warm, a model that fails to load."""

from __future__ import annotations

import json
import math
import re
import signal
import threading
import time

import httpx
import pytest

from tests.api_helpers import error_code, metric, results, score, serve_in_thread, wait_until_idle
from tests.conftest import LiveServer


def test_readyz_is_503_until_the_model_is_loaded(tiny_reward_model):
    from reward_models.api import Limits, create_app
    from reward_models.scoring import RewardScorer

    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return RewardScorer(tiny_reward_model, device="cpu")

    with serve_in_thread(create_app(slow_loader, Limits()), wait_ready=False) as url:
        try:
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


def test_a_model_that_fails_to_load_stops_the_server_and_non_loopback_warns(tmp_path, monkeypatch, caplog, capsys):
    from reward_models.serve import main

    monkeypatch.delenv("RLHF_API_KEY", raising=False)
    with caplog.at_level("INFO"):
        code = main(["--model", str(tmp_path), "--host", "0.0.0.0", "--port", "0"])  # an empty directory
    assert code == 1
    assert "without an API key" in caplog.text and "model load failed" in caplog.text
    assert re.search(r"serving on http://0\.0\.0\.0:\d+", capsys.readouterr().out)


def _strict_json(response: httpx.Response):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(response.text, parse_constant=refuse)


def test_a_non_finite_reward_is_an_item_error_not_invalid_json(tiny_reward_model):
    import torch

    from reward_models.api import Limits, create_app
    from reward_models.scoring import RewardScorer

    scorer = RewardScorer(tiny_reward_model, device="cpu")
    poison = scorer.tokenizer("§", add_special_tokens=False)["input_ids"]  # a model that overflows on one token
    with torch.no_grad():
        scorer.model.get_input_embeddings().weight[poison] = float("nan")
    with serve_in_thread(create_app(scorer, Limits())) as url:
        response = httpx.post(f"{url}/v1/score", json={"items": [{"id": "bad", "text": "price: 5 §"},
                                                                 {"id": "ok", "text": "price: 5"}]})
        got = _strict_json(response)["results"]
        assert got[0]["reward"] is None and got[0]["error"]["code"] == "non_finite_reward"
        assert got[1]["error"] is None and math.isfinite(got[1]["reward"])
        compared = httpx.post(f"{url}/v1/compare", json={"prompt": "p", "chosen": "§", "rejected": "ok"})
        assert compared.status_code == 422 and _strict_json(compared)["error"]["code"] == "non_finite_reward"


def test_a_causal_lm_is_refused_as_a_reward_model(tiny_reward_model, caplog):
    """An SFT model has no score head: loaded as a reward model its head would be random and every reward
    noise. Refused at start, unless the caller says that is what they want."""
    from reward_models.scoring import RewardScorer
    from reward_models.serve import main
    from rlhf.models import resolve_model_path

    causal = resolve_model_path("tiny:demo")  # the causal LM the tiny RM was made from
    with pytest.raises(ValueError, match=r"not a reward model: its checkpoint has no score head \(score.weight\)"):
        RewardScorer(causal, device="cpu")
    assert RewardScorer(causal, device="cpu", allow_untrained_head=True).score([{"text": "hi"}])[0]["tokens"] > 1
    with caplog.at_level("INFO"):
        assert main(["--model", causal, "--port", "0"]) == 1  # it does not serve, nor report ready
    assert "not a reward model" in caplog.text and "--allow-untrained-head" in caplog.text


@pytest.mark.parametrize("path", ["runs/demo/sft", "/nonexistent/reward", "./rm"])
def test_a_missing_model_directory_says_so(path, caplog):
    from reward_models.scoring import RewardScorer
    from reward_models.serve import main

    with pytest.raises(FileNotFoundError, match="no such model directory"):
        RewardScorer(path, device="cpu")
    with caplog.at_level("INFO"):
        assert main(["--model", path, "--port", "0"]) == 2  # before it even listens
    assert "no such model directory" in caplog.text and "Repo id" not in caplog.text


def test_a_disconnected_clients_queued_items_are_not_computed(hold_reward_server):
    """Four clients send 256 items each and leave before the batcher (holding items 3 s for company) runs
    them: the items are dropped from the queue, and the model computes none of them."""
    server = hold_reward_server
    wait_until_idle(server)
    tokens, cancelled = metric(server, "rm_tokens_total"), metric(server, 'rm_items_total{outcome="cancelled"}')
    body = {"items": [{"id": i, "text": "I have sent you the tracking link for your lamp. " * 3} for i in range(256)]}

    def abandon():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/score", json=body, timeout=httpx.Timeout(30, read=0.3))

    threads = [threading.Thread(target=abandon) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until_idle(server)  # then a new round, after whatever forward the abandoned items got
    after = results(score(server, [{"id": 0, "text": "still serving"}]))[0]
    assert metric(server, "rm_tokens_total") - tokens == after["tokens"]  # before: 4 x 256 items computed for nobody
    assert metric(server, 'rm_items_total{outcome="cancelled"}') - cancelled == 1024


def test_sigterm_drains_in_flight_work_then_answers_json_503(tiny_reward_model, tmp_path):
    """SIGTERM with more work in flight than the grace period allows: /readyz turns 503 at once (the port
    stays open while draining, so a load balancer sees it), new requests are refused, and what cannot
    finish is answered with the API's JSON 503 + Retry-After; then the process exits 0, without tracebacks."""
    server = LiveServer(tiny_reward_model, tmp_path / "server.log", "--max-batch-items", "1",
                        "--shutdown-grace", "1").wait_ready()
    try:
        body = {"items": [{"id": i, "text": "I have issued a full refund for your lamp. " * 25} for i in range(256)]}
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(httpx.post(f"{server.url}/v1/score", json=body,
                                                                              timeout=60))) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while metric(server, "rm_queue_depth") < 600:  # one item per forward: seconds of work queued
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        while (ready := httpx.get(f"{server.url}/readyz")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        late = score(server, [{"id": 0, "text": "too late"}])
        assert late.status_code == 503 and error_code(late) == "shutting_down" and late.headers["Retry-After"]
        for t in threads:
            t.join()
        assert {a.status_code for a in answers} <= {200, 503} and 503 in {a.status_code for a in answers}
        for a in answers:
            if a.status_code == 503:
                assert error_code(a) == "shutting_down" and a.headers["Retry-After"].isdigit()
        assert server.proc.wait(30) == 0
        logs = server.logs()
        assert "Traceback" not in logs and "CancelledError" not in logs and "draining" in logs
    finally:
        server.stop()
