"""Replicas: ``--workers N`` behind one port, and ``RewardClient`` over a list of URLs (spread, failover),
over real HTTP on 127.0.0.1."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from reward_models.client import RemoteRewardFunction, RewardClient
from tests.api_helpers import metric
from tests.conftest import LiveServer

SCORED = 'rm_requests_total{endpoint="/v1/score",status="200"}'


@pytest.fixture(scope="module")
def spare_server(tiny_reward_model, tmp_path_factory):
    """A second replica of the default server, to be killed."""
    server = LiveServer(tiny_reward_model, tmp_path_factory.mktemp("spare") / "server.log").wait_ready()
    yield server
    server.stop()


def test_the_client_spreads_requests_and_fails_over(reward_server, spare_server):
    replicas = (reward_server, spare_server)
    before = [metric(s, SCORED) for s in replicas]
    client = RewardClient([s.url for s in replicas], retries=1, backoff=0.1)
    item = [{"id": 0, "prompt": "Where is my lamp?", "response": "I have sent you the tracking link."}]
    rewards = [client.score(item)[0]["reward"] for _ in range(6)]
    assert [metric(s, SCORED) - b for s, b in zip(replicas, before)] == [3, 3]  # round-robin
    spare_server.proc.kill()  # a replica dies without a word
    spare_server.proc.wait()
    rewards += [client.score(item)[0]["reward"] for _ in range(6)]  # each goes on to the live one
    assert len(set(rewards)) == 1
    assert metric(reward_server, SCORED) - before[0] == 9
    reward_fn = RemoteRewardFunction(client)
    assert reward_fn(["Where is my lamp?"], ["I have sent you the tracking link."]) == pytest.approx(
        [client.score(item)[0]["normalized_reward"]])


def _workers(pid: int) -> list[int]:
    """The worker processes of a server (multiprocessing's resource tracker is a child too)."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            spawned = b"spawn_main" in (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == pid and spawned:
            out.append(int(proc.name))
    return out


def test_workers_share_one_port_and_drain_together(tiny_reward_model, tmp_path):
    server = LiveServer(tiny_reward_model, tmp_path / "server.log", "--workers", "2", "--wait-policy", "always",
                        "--max-wait-ms", "3000")
    try:
        server.wait_ready()
        deadline = time.monotonic() + 120
        while len(re.findall(r"model ready", server.logs())) < 2:  # /readyz came from one of them
            assert time.monotonic() < deadline and server.proc.poll() is None, server.logs()
            time.sleep(0.1)
        workers = _workers(server.proc.pid)
        assert len(workers) == 2
        answer = {}
        held = threading.Thread(target=lambda: answer.update(r=httpx.post(
            f"{server.url}/v1/score", json={"items": [{"id": 0, "text": "held for company"}]}, timeout=30)))
        held.start()
        while metric(server, "rm_queue_depth") < 1:  # each probe reaches one worker or the other
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)  # to the parent: each worker drains
        held.join()
        assert answer["r"].status_code == 200 and answer["r"].json()["results"][0]["error"] is None
        assert server.proc.wait(30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
        assert "Traceback" not in server.logs()
    finally:
        server.stop()
