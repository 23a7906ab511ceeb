"""Helpers shared by the scoring-API tests (tests/test_api_*.py): requests over real HTTP, and metrics."""

from __future__ import annotations

import contextlib

import httpx

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


@contextlib.contextmanager
def serve_in_thread(app, wait_ready: bool = True):
    """``app`` on 127.0.0.1:<free port> in a thread of this process (real HTTP, no subprocess start-up):
    yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started or (wait_ready and httpx.get(f"{url}/readyz").status_code != 200):
            assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until_idle(server, timeout: float = 20.0) -> None:
    """Until the server's queue is empty (a held item from an earlier test has left)."""
    import time

    deadline = time.monotonic() + timeout
    while metric(server, "rm_queue_depth") > 0:
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.05)
