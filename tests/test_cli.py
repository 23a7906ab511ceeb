"""The ``rlhf`` command as a user meets it: one-line errors for mistakes, offline awareness, help, saved configs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

RECIPES = sorted((REPO / "configs" / "recipes").glob("*/pipeline*.yaml"))


def rlhf(*args: str, env: dict | None = None, launcher: tuple[str, ...] = ("-m", "rlhf"), timeout: int = 300):
    return subprocess.run([sys.executable, *launcher, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def assert_one_line_usage_error(result, fragment: str, prefix: str = "rlhf ") -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and ": error: " in lines[0], result.stderr
    assert fragment in lines[0], lines[0]


MISTAKES = {  # mistake class: (command line, what the one line must say)
    "missing local model path": (["sft", "--config", "demo/sft.yaml", "model_name_or_path=no/such/dir"],
                                 "model_name_or_path=no/such/dir: no such directory"),
    "missing relative model dir": (["reward", "demo/reward.yaml", "model_name_or_path=sft_out"],
                                   "model_name_or_path=sft_out: no such directory"),
    "uncached Hub model offline": (["reward", "demo/reward.yaml", "model_name_or_path=runs/sft"],
                                   "not a local directory, and offline (HF_HUB_OFFLINE=1)"),
    "unknown key on the command line": (["ppo", "--config", "demo/ppo.yaml", "learnin_rate=1e-4"],
                                        "unknown key 'learnin_rate' on the command line; did you mean 'learning_rate'?"),
    "missing config file": (["sft", "--config", "no/such.yaml"], "no/such.yaml: no such config file"),
    "bad value type": (["ppo", "--config", "demo/ppo.yaml", "ppo_epochs=four"], "invalid int value: 'four'"),
    "value a config refuses": (["ppo", "--config", "demo/ppo.yaml", "report_to=wandbb"], "report_to: unknown"),
    "no configuration": (["ppo"], "no configuration given: rlhf ppo --config FILE"),
    "uncached Hub dataset offline": (["sft", "demo/sft.yaml", "dataset=nobody/no-such-set"],
                                     "dataset=nobody/no-such-set: offline (HF_HUB_OFFLINE=1)"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_is_one_line_and_exit_2(mistake):
    args, fragment = MISTAKES[mistake]
    assert_one_line_usage_error(rlhf(*args), fragment, prefix=f"rlhf {args[0]}: error: ")


def test_an_unknown_key_in_the_yaml_names_the_file_and_the_close_key(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("dataset: demo\nmodel_name_or_path: tiny:demo\nnum_train_epochz: 2\n")
    assert_one_line_usage_error(rlhf("sft", config), "unknown key 'num_train_epochz' in the config file; "
                                                     "did you mean 'num_train_epochs'?")


def test_a_broken_yaml_is_one_line(tmp_path):
    config = tmp_path / "ppo.yaml"
    config.write_text("rewards: [\n")
    assert_one_line_usage_error(rlhf("ppo", "--config", config), "not valid YAML")


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_the_scripts_report_mistakes_like_the_command(stage):
    result = rlhf(launcher=(str(REPO / "scripts" / f"{stage}.py"),))
    assert_one_line_usage_error(result, f"no configuration given: rlhf {stage} --config FILE")


def test_under_accelerate_launch_the_child_says_it_once():
    """accelerate's launcher wraps a failed child in its own traceback unless -q; the child's line comes once."""
    result = rlhf("-q", "--num_processes", "1", REPO / "scripts" / "ppo.py", "--config", "demo/ppo.yaml",
                  "clip_rang=0.1", launcher=("-m", "accelerate.commands.launch"))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("rlhf ppo: error: ")]
    assert errors == ["rlhf ppo: error: unknown key 'clip_rang' on the command line; did you mean 'clip_range'? "
                      "(rlhf ppo --help lists the keys)"]
