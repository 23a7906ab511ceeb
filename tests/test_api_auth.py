"""Auth and privacy over real HTTP: the bearer key, the key never a flag, no request text in any log."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.api_helpers import AUTH, error_code, post, results, score, serve_in_thread
from tests.conftest import API_KEY


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


@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_an_empty_key_is_an_error_not_auth_off(monkeypatch, value):
    from reward_models.api import Limits, create_app

    monkeypatch.setenv("RLHF_API_KEY", value)
    with pytest.raises(ValueError, match="RLHF_API_KEY is set but empty"):
        create_app(lambda: None, Limits())
    from reward_models.serve import main

    assert main(["--model", "unused", "--port", "0"]) == 2  # the server refuses to start


def test_a_key_with_surrounding_whitespace_is_stripped(monkeypatch, tiny_reward_model):
    from reward_models.api import Limits, create_app
    from reward_models.client import RewardClient
    from reward_models.scoring import RewardScorer

    monkeypatch.setenv("RLHF_API_KEY", "  s3cret-key\n")  # e.g. RLHF_API_KEY="$(cat keyfile)" without the strip
    with serve_in_thread(create_app(RewardScorer(tiny_reward_model, device="cpu"), Limits())) as url:
        body = {"items": [{"id": 1, "text": "x"}]}
        assert httpx.post(f"{url}/v1/score", json=body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert httpx.post(f"{url}/v1/score", json=body).status_code == 401
        assert RewardClient(url).score(body["items"])[0]["error"] is None  # the client strips it too
    monkeypatch.setenv("RLHF_API_KEY", "naïve-ключ")  # not sendable in an HTTP header as it is
    with pytest.raises(ValueError, match="printable ASCII"):
        create_app(lambda: None, Limits())
