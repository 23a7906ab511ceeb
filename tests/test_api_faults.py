"""Start-up and failure: /readyz before the model is warm, a model that fails to load."""

from __future__ import annotations

import re
import threading
import time

import httpx

from tests.api_helpers import error_code


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
