"""Limits over real HTTP: 413 for sizes, per-item errors for length, left truncation on request, 429 for a
full queue."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx

from tests.api_helpers import AUTH, error_code, metric, post, results, score


def test_huge_inputs(reward_server):
    huge = "tracking link " * 80_000  # ~1.1 MB, hundreds of thousands of tokens
    got = results(score(reward_server, [{"id": "h", "text": huge}, {"id": "s", "text": "short"}]))
    assert got[0]["error"]["code"] == "too_long" and got[0]["tokens"] is None and got[1]["error"] is None
    assert '"truncate": true' in got[0]["error"]["message"]
    cut = results(score(reward_server, [{"id": "h", "text": huge}], truncate=True))[0]
    assert cut["error"] is None and cut["truncated"] is True and cut["tokens"] == 384  # what the model read
    over = post(reward_server, "/v1/score", content=b'{"items": [{"id": 1, "text": "' + b"x" * (5 << 20) + b'"}]}',
                headers={"Content-Type": "application/json"})
    assert over.status_code == 413 and error_code(over) == "body_too_large"
    many = score(reward_server, [{"id": i, "text": "x"} for i in range(257)])
    assert many.status_code == 413 and error_code(many) == "too_many_items"
    assert len(results(score(reward_server, [{"id": i, "text": "x"} for i in range(256)]))) == 256


def _proc(pid: int) -> tuple[float, float, float]:
    """(RSS MB, peak RSS MB since the last reset, CPU seconds) of a process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024,
            (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK"))


def test_concurrent_huge_strings_cost_bounded_memory_and_cpu(reward_server):
    """Six 3.9 MB strings at once, with truncation: cut before tokenizing, so neither memory nor CPU grows
    with the input (before: 585k tokens each, +3 GB RSS, ~16 CPU-seconds)."""
    pid, huge = reward_server.proc.pid, "tracking link " * 280_000
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak RSS to the current RSS
    rss, _, cpu = _proc(pid)
    requests = [("/v1/score", {"items": [{"id": 0, "text": huge}], "truncate": True})] * 4 + [
        ("/v1/compare", {"prompt": huge, "chosen": "Sent.", "rejected": "No.", "truncate": True})] * 2
    answers = [None] * len(requests)

    def send(i):
        answers[i] = post(reward_server, *requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, peak, cpu_after = _proc(pid)
    print(f"peak RSS +{peak - rss:.0f} MB, {cpu_after - cpu:.2f} CPU-seconds for six 3.9 MB strings")
    assert peak - rss < 500  # the bodies themselves: a few copies of 6 x 3.9 MB
    assert cpu_after - cpu < 4.0
    assert [a.status_code for a in answers] == [200] * 6
    assert all(a.json()["results"][0]["tokens"] == 384 for a in answers[:4])
    assert all(a.json()["chosen"]["truncated"] and a.json()["rejected"]["tokens"] == 384 for a in answers[4:])


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
    assert rejected[0]["tokens"] is None and "limit of 96" in rejected[0]["error"]["message"]
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


def _address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _closed_by_server(sock: socket.socket, timeout: float = 15.0) -> bool:
    """Whether the server closes the connection within ``timeout`` (EOF or reset), reading what it sends."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_half_open_and_trickling_connections_are_closed(conn_reward_server):
    """Connections that send nothing, or their headers or body a byte at a time, are closed after the
    header/body timeouts (1 s on this server) instead of being held forever."""
    address = _address(conn_reward_server)
    silent = [socket.create_connection(address) for _ in range(3)]
    slow_headers, slow_body = socket.create_connection(address), socket.create_connection(address)
    body = b'{"items": [{"id": 1, "text": "' + b"x" * 200 + b'"}]}'
    slow_body.sendall(b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body))
    closed = {}

    def trickle(name, sock, data):  # one byte every 0.1 s: 20+ s for all of it, unless the server hangs up
        for i in range(len(data)):
            try:
                sock.send(data[i:i + 1])
            except OSError:
                closed[name] = i
                return
            time.sleep(0.1)

    threads = [threading.Thread(target=trickle, args=("headers", slow_headers, b"GET /healthz HTTP/1.1\r\nHost: t\r\n" * 8)),
               threading.Thread(target=trickle, args=("body", slow_body, body))]
    for t in threads:
        t.start()
    assert all(_closed_by_server(s) for s in silent)
    for t in threads:
        t.join()
    assert set(closed) == {"headers", "body"}  # cut off mid-way, long before the last byte
    assert results(score(conn_reward_server, [{"id": 0, "text": "still serving"}]))[0]["error"] is None


def test_idle_keep_alive_and_the_connection_limit(conn_reward_server):
    address = _address(conn_reward_server)
    kept = socket.create_connection(address)
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    assert _closed_by_server(kept)  # idle after its answer: closed after timeout_keep_alive (1 s)
    hogs = [socket.create_connection(address) for _ in range(6)]  # the limit: 6 connections + requests
    time.sleep(0.2)
    refused = httpx.get(f"{conn_reward_server.url}/healthz")
    assert refused.status_code == 503  # uvicorn's own answer, before the app
    assert all(_closed_by_server(h) for h in hogs)  # half-open: closed after the header timeout
    assert httpx.get(f"{conn_reward_server.url}/healthz").status_code == 200
