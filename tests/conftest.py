"""Shared test set-up: a private RLHF_HOME (tiny model and demo data built once per session), W&B offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory):
    home = tmp_path_factory.mktemp("rlhf_home")
    os.environ["RLHF_HOME"] = str(home)
    os.environ.pop("WANDB_API_KEY", None)  # never go online from tests
    os.environ["WANDB_MODE"] = "offline"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield home


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command the way a user would (``python -m accelerate.commands.launch ...`` etc.)."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def accelerate_launch(script: str, *args: str, num_processes: int = 1, env: dict | None = None, timeout: int = 600):
    launch = ["-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if num_processes > 1:
        launch.append("--multi_gpu")
        env = {"ACCELERATE_USE_CPU": "1", **(env or {})}
    return run_cli([*launch, str(REPO / "scripts" / script), *args], timeout=timeout, env=env)


@pytest.fixture(scope="session")
def demo_pipeline(tmp_path_factory):
    """The main job, run once as `make demo` runs it: (output dir, combined log of the three stages)."""
    out = tmp_path_factory.mktemp("demo")
    result = run_cli(["-m", "rlhf", "pipeline", "--config", str(REPO / "configs" / "demo" / "pipeline.yaml"),
                      "--output-dir", str(out)], timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return out, result.stdout + result.stderr


@pytest.fixture(scope="session")
def demo_sft(demo_pipeline):
    """The demo SFT stage's output dir and the pipeline's log."""
    out, log = demo_pipeline
    return out / "sft", log


@pytest.fixture(scope="session")
def demo_reward(demo_pipeline):
    """The demo reward-model stage (initialised from the demo SFT model): output dir and log."""
    out, log = demo_pipeline
    return out / "reward", log


@pytest.fixture(scope="session")
def untrained_rm(_isolated_environment, tmp_path_factory):
    """A reward model (and critic source) from the tiny model, with a recognisable random score head."""
    import torch

    from reward_models.train import load_reward_model

    out = tmp_path_factory.mktemp("rm_for_ppo")
    model, tokenizer = load_reward_model("tiny:demo", None, None, False)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# reward-model scoring API: a tiny (untrained) reward model and live servers over real HTTP

API_KEY = "test-key-5f0c2b"  # handed to the auth server through the environment only


@pytest.fixture(scope="session")
def tiny_reward_model(_isolated_environment, tmp_path_factory) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward_models.scoring import save_reward_stats
    from rlhf.models import resolve_model_path

    base = resolve_model_path("tiny:demo")
    out = str(tmp_path_factory.mktemp("tiny_rm"))
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    save_reward_stats(out, 0.5, 2.0, max_length=384)  # as if trained with max_length=384
    return out


class LiveServer:
    """``scripts/serve_reward.py`` in a subprocess on 127.0.0.1:<free port>; its output goes to a file."""

    def __init__(self, model_dir: str, log_path: Path, *flags: str, env: dict | None = None):
        self.log_path, self.url = log_path, None
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "serve_reward.py"), "--model", model_dir, "--port", "0",
             "--threads", "1", *flags],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})},
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> "LiveServer":
        """Read the port the server printed, then poll /readyz until the model is warm."""
        import re
        import time

        import httpx

        def ready() -> bool:
            try:  # a server still importing or loading may hold the socket unanswered: not ready yet
                return httpx.get(f"{self.url}/readyz", timeout=10).status_code == 200
            except httpx.TransportError:
                return False

        deadline = time.monotonic() + timeout
        while self.url is None or not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not get ready:\n{self.logs()}")
            if self.url is None and (match := re.search(r"serving on (http://127\.0\.0\.1:\d+)", self.logs())):
                self.url = match[1]
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# name -> (flags, extra environment); all three start together on first use (start-up is mostly imports)
API_SERVERS = {
    # default limits, no key
    "default": ((), {}),
    # a key in a custom variable, and small limits so that every one of them is cheap to hit
    "auth": (("--api-key-env", "RM_TEST_KEY", "--max-items", "4", "--max-body-bytes", "20000",
              "--max-total-tokens", "300", "--max-length", "96"), {"RM_TEST_KEY": API_KEY}),
    # a one-item queue whose batcher holds each item 1.5 s waiting for company: a second request while
    # one is held is refused with 429, deterministically
    "queue": (("--max-queue", "1", "--max-items", "1", "--max-batch-items", "8", "--wait-policy", "always",
               "--max-wait-ms", "1500"), {}),
    # a batcher that holds items 3 s waiting for company, with room for 4096 of them in one batch: what a
    # client abandons within those 3 s is, deterministically, still queued
    # connection limits small enough to hit: 1 s to send headers / a body / the next request, 6 connections
    "conn": (("--timeout-header", "1", "--timeout-body", "1", "--timeout-keep-alive", "1", "--limit-concurrency", "6"),
             {}),
    "hold": (("--wait-policy", "always", "--max-wait-ms", "3000", "--max-batch-items", "4096", "--max-batch-tokens",
              "4000000", "--max-queue", "4096"), {}),
}


@pytest.fixture(scope="session")
def api_servers(tiny_reward_model, tmp_path_factory):
    servers = {name: LiveServer(tiny_reward_model, tmp_path_factory.mktemp(f"server_{name}") / "server.log", *flags,
                                env=env) for name, (flags, env) in API_SERVERS.items()}
    yield servers
    for server in servers.values():  # all at once: each drains (briefly) on SIGTERM
        if server.proc.poll() is None:
            server.proc.terminate()
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def reward_server(api_servers) -> LiveServer:
    return api_servers["default"].wait_ready()


@pytest.fixture(scope="session")
def auth_reward_server(api_servers) -> LiveServer:
    return api_servers["auth"].wait_ready()


@pytest.fixture(scope="session")
def queue_reward_server(api_servers) -> LiveServer:
    return api_servers["queue"].wait_ready()


@pytest.fixture(scope="session")
def hold_reward_server(api_servers) -> LiveServer:
    return api_servers["hold"].wait_ready()


@pytest.fixture(scope="session")
def conn_reward_server(api_servers) -> LiveServer:
    return api_servers["conn"].wait_ready()
