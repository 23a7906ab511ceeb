"""``RewardClient`` and ``RemoteRewardFunction`` against live servers (tests/conftest.py), over real HTTP."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from reward_models.client import (
    RemoteRewardFunction,
    RewardAPIError,
    RewardAPIUnavailable,
    RewardClient,
    RewardItemError,
)
from tests.conftest import API_KEY

PROMPTS = [[{"role": "user", "content": "Where is my lamp order?"}],
           [{"role": "system", "content": "You answer customer questions for a shop."},
            {"role": "user", "content": "I want a refund for my kettle."}],
           "Please cancel my chair order.", [{"role": "user", "content": "我的耳机坏了 🎧"}],
           [{"role": "user", "content": "Can I swap my watch for another color?"}]]
RESPONSES = ["I have sent you the tracking link for your lamp.", "I have issued a full refund for your kettle.",
             "", "我会寄给你一个新的 🎧", "I have set up an exchange for your watch."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_idle(server, timeout: float = 10.0) -> None:
    """The queue server holds each item 1.5 s: let the previous test's item leave before the next test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if "rm_queue_depth 0.0" in text:
            return
        time.sleep(0.05)
    raise AssertionError("the queue did not drain")


def test_score_compare_models_ready(reward_server):
    with RewardClient(reward_server.url) as client:
        assert client.ready()
        items = [{"id": i, "prompt": p, "response": r} for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
        results = client.score(items)
        assert [r["id"] for r in results] == list(range(5)) and all(r["error"] is None for r in results)
        models = client.models()
        assert client.model_revision == models["model_revision"] == models["models"][0]["revision"]
        compared = client.compare(PROMPTS[0], RESPONSES[0], "Read the manual.")
        assert compared["chosen"]["reward"] == pytest.approx(results[0]["reward"], abs=1e-5)
        assert 0 < compared["p_chosen"] < 1


def test_remote_reward_function(reward_server):
    client = RewardClient(reward_server.url)
    results = client.score([{"id": i, "prompt": p, "response": r} for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))])
    normalized = RemoteRewardFunction(client)(PROMPTS, RESPONSES)
    assert normalized == pytest.approx([r["normalized_reward"] for r in results], abs=1e-5)
    raw = RemoteRewardFunction(client, normalized=False, batch_size=2)(PROMPTS, RESPONSES)  # 3 requests
    assert raw == pytest.approx([r["reward"] for r in results], abs=1e-5)
    assert RemoteRewardFunction(client).model_revision == client.model_revision
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        RemoteRewardFunction(client)(PROMPTS[:2], RESPONSES[:1])


def test_item_errors_raise_or_truncate(auth_reward_server):
    client = RewardClient(auth_reward_server.url, api_key=API_KEY)  # max 96 tokens per item, 4 items per request
    long_reply = "I have issued a full refund for your lamp. " * 30
    reward_fn = RemoteRewardFunction(client)
    assert reward_fn.batch_size is None
    with pytest.raises(RewardItemError, match="item 5: too_long") as error:
        reward_fn(PROMPTS + PROMPTS[:1], RESPONSES + [long_reply])
    assert error.value.index == 5 and error.value.code == "too_long"
    assert reward_fn.batch_size == 4  # learnt from /v1/models: no request is ever a 413
    rewards = RemoteRewardFunction(client, truncate=True)(PROMPTS + PROMPTS[:1], RESPONSES + [long_reply])
    assert len(rewards) == 6 and all(isinstance(r, float) for r in rewards)


def test_api_key_from_the_environment_and_refusals(auth_reward_server, monkeypatch):
    monkeypatch.setenv("RLHF_API_KEY", API_KEY)
    assert RewardClient(auth_reward_server.url).models()["auth"] is True
    start = time.monotonic()
    with pytest.raises(RewardAPIError) as refused:
        RewardClient(auth_reward_server.url, api_key="wrong", retries=3, backoff=1.0).models()
    assert refused.value.status == 401 and refused.value.code == "unauthorized"
    assert not isinstance(refused.value, RewardAPIUnavailable) and time.monotonic() - start < 1.0  # 4xx: no retry
    with pytest.raises(RewardAPIError, match="too_many_items") as too_big:
        RewardClient(auth_reward_server.url, retries=3).score([{"id": i, "text": "x"} for i in range(5)])
    assert too_big.value.status == 413


def test_retries_a_429_after_retry_after(queue_reward_server):
    server = queue_reward_server
    wait_until_idle(server)
    refused_before = _count_429(server)
    holder = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/score", timeout=30,
                                                       json={"items": [{"id": 0, "text": "first"}]}))
    holder.start()
    while "rm_queue_depth 1.0" not in httpx.get(f"{server.url}/metrics").text:
        time.sleep(0.02)
    start = time.monotonic()
    result = RewardClient(server.url, retries=6, backoff=0.1).score([{"id": 1, "text": "second"}])
    holder.join()
    assert result[0]["error"] is None
    assert _count_429(server) > refused_before  # it was refused at least once, and retried
    assert time.monotonic() - start >= 1.0  # it waited the server's Retry-After, not its own 0.1 s backoff


def _count_429(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('rm_requests_total{endpoint="/v1/score",status="429"}'))


def test_gives_up_on_429_and_times_out(queue_reward_server):
    server = queue_reward_server
    wait_until_idle(server)
    with pytest.raises(RewardAPIUnavailable, match="ReadTimeout"):
        RewardClient(server.url, timeout=0.3, retries=0).score([{"id": 0, "text": "held 1.5 s"}])
    # the abandoned item left the queue with its client: the next request is taken
    assert RewardClient(server.url, retries=0).score([{"id": 1, "text": "x"}])[0]["error"] is None
    holder = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/score", timeout=30,
                                                       json={"items": [{"id": 0, "text": "first"}]}))
    holder.start()
    while "rm_queue_depth 1.0" not in httpx.get(f"{server.url}/metrics").text:
        time.sleep(0.02)
    with pytest.raises(RewardAPIUnavailable, match="429") as full:  # no retries: a 429 is final
        RewardClient(server.url, retries=0).score([{"id": 1, "text": "x"}])
    holder.join()
    assert full.value.status == 429 and full.value.code == "queue_full"


def test_retries_connection_refused_until_the_server_comes(reward_server):
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RewardAPIUnavailable, match="ConnectError"):
        RewardClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.1).models()
    assert time.monotonic() - start >= 0.15  # two backoffs: 0.05..0.1 + 0.1..0.2
    assert not RewardClient(f"http://127.0.0.1:{port}").ready()
    proxy = DelayedProxy(port, reward_server.url, delay=0.6)
    try:
        client = RewardClient(f"http://127.0.0.1:{port}", retries=8, backoff=0.1)
        assert client.score([{"id": 0, "text": "hello"}])[0]["error"] is None
        assert proxy.accepted >= 1
    finally:
        proxy.close()


class DelayedProxy:
    """Starts listening on ``port`` only after ``delay`` seconds, then forwards bytes to the real server:
    a server that is not up yet, then is."""

    def __init__(self, port: int, target_url: str, delay: float):
        host, target_port = target_url.removeprefix("http://").split(":")
        self.target = (host, int(target_port))
        self.accepted, self.closed = 0, threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        threading.Timer(delay, self._listen, args=(port,)).start()

    def _listen(self, port: int):
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()
        self.sock.settimeout(0.1)
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            upstream = socket.create_connection(self.target)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.closed.set()
        time.sleep(0.15)
        self.sock.close()
