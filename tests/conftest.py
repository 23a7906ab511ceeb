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
def demo_sft(tmp_path_factory):
    """The demo SFT stage run once, as a user runs it: (output dir, combined log)."""
    out = tmp_path_factory.mktemp("demo") / "sft"
    result = accelerate_launch("sft.py", "--config", str(REPO / "configs" / "demo" / "sft.yaml"), f"output_dir={out}",
                               timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, result.stdout + result.stderr


@pytest.fixture(scope="session")
def demo_reward(demo_sft):
    """The demo reward-model stage, initialised from the demo SFT model: (output dir, combined log)."""
    sft_dir, _ = demo_sft
    out = sft_dir.parent / "reward"
    result = accelerate_launch("reward.py", "--config", str(REPO / "configs" / "demo" / "reward.yaml"),
                               f"output_dir={out}", f"model_name_or_path={sft_dir}", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, result.stdout + result.stderr
