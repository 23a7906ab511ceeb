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
    "missing relative model dir": (["reward", "demo/reward.yaml", "model_name_or_path=./sft_out"],
                                   "model_name_or_path=./sft_out: no such directory"),
    "bare name, neither a dir nor cached": (["sft", "demo/sft.yaml", "model_name_or_path=sft_out"],
                                            "model_name_or_path=sft_out: not a local directory"),
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


def without_offline_variables(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    # a Hub that refuses connections at once: unreachable by construction, wherever the test runs
    return {**env, "PYTHONPATH": str(REPO), "HF_ENDPOINT": "http://127.0.0.1:9", **extra}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_an_offline_dry_run_goes_offline_at_once_without_hf_hub_offline(recipe):
    result = subprocess.run([sys.executable, "-m", "rlhf", "pipeline", "--config", str(recipe), "--dry-run"],
                            capture_output=True, text=True, cwd=REPO, timeout=300, env=without_offline_variables())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dry run: 0 problem(s)" in result.stdout
    assert result.stderr.count("cannot be reached (127.0.0.1:9): running offline as with HF_HUB_OFFLINE=1") == 1
    # no Hub request was made (one would retry, then log its failure)
    assert "Retrying" not in result.stderr and "MaxRetryError" not in result.stderr + result.stdout
    if "Qwen/" in recipe.read_text():  # the dry run warns exactly as the stage will fail
        assert "WARNING: model_name_or_path=Qwen/" in result.stdout and "not in the local cache" in result.stdout


def test_a_stage_offline_fails_at_once_on_an_uncached_hub_model():
    result = subprocess.run([sys.executable, "-m", "rlhf", "reward", "demo/reward.yaml",
                             "model_name_or_path=Qwen/Qwen2.5-0.5B"], capture_output=True, text=True, cwd=REPO,
                            timeout=300, env=without_offline_variables())
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith("rlhf reward: error: model_name_or_path=Qwen/Qwen2.5-0.5B: not a "
                                                     "local directory, and offline (HF_HUB_OFFLINE=1)")


@pytest.mark.parametrize("stage, keys", [("ppo", ["ppo_epochs", "clip_range", "gamma", "kl_coef"]),
                                         ("sft", ["learning_rate", "num_train_epochs", "finetune"])])
def test_stage_help_starts_with_the_usage_and_the_keys_changed_most(stage, keys):
    result = rlhf(stage, "--help")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"usage: rlhf {stage} --config FILE [key=value ...]")
    common = lines[lines.index("keys changed most:") + 1:lines.index("every key:")]
    for key in keys:
        line = next(line for line in common if line.split()[0] == key)
        assert "(default: " in line and len(line.split()) > 3, line  # a help text and the default


def test_a_positional_config_is_the_config_and_the_run_saves_its_resolved_config(tmp_path):
    out = tmp_path / "sft"
    result = rlhf("sft", "configs/demo/sft.yaml", f"output_dir={out}", "max_steps=1", "eval_strategy=no",
                  "num_sample_generations=0", "gold_eval_prompts=0", "report_to=none", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["ModelConfig"]["model_name_or_path"] == "tiny:demo"  # from the positional file, not TRL's default
    assert saved["SFTConfig"]["learning_rate"] == 5.0e-3 and saved["SFTConfig"]["max_steps"] == 1
    assert saved["SFTScriptArguments"]["num_sample_generations"] == 0


def chat(stdin: str, *flags: str):
    return subprocess.run([sys.executable, "-m", "rlhf", "chat", "--model", "tiny:demo", "--temperature", "1",
                           "--max-new-tokens", "8", *flags], input=stdin, capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def replies(result) -> list[str]:
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.startswith("model> ")]


def test_chat_over_piped_stdin_keeps_the_conversation_and_reset_forgets_it():
    first, second = "What is 2 + 2?", "And 3 + 3?"
    both = replies(chat(f"{first}\n{second}\n"))
    reset = replies(chat(f"{first}\n/reset\n{second}\n"))
    alone = replies(chat(f"{second}\n"))
    assert len(both) == 2 and len(reset) == 2 and len(alone) == 1
    assert reset[1] == alone[0]  # after /reset the model sees only the new turn
    assert both[1] != alone[0]  # without it, the first turn is part of the prompt


def test_chat_refuses_a_missing_model_in_one_line():
    assert_one_line_usage_error(subprocess.run(
        [sys.executable, "-m", "rlhf", "chat", "--model", "no/such/policy"], capture_output=True, text=True,
        cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}), "no such directory", "rlhf chat: ")


def test_export_merges_a_lora_adapter_into_a_model_with_the_same_logits(tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_causal_lm, load_tokenizer

    base, tokenizer = load_causal_lm("tiny:demo"), load_tokenizer("tiny:demo")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained-looking adapter: lora_B starts at zero, which would merge to the base
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    adapter, out = tmp_path / "adapter", tmp_path / "merged"
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    result = rlhf("export", "--adapter", adapter, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "adapter_config.json").exists()
    ids = torch.tensor([tokenizer("hello there, how are you?")["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    reloaded = PeftModel.from_pretrained(load_causal_lm("tiny:demo"), adapter).eval()
    with torch.no_grad():
        expected, got = reloaded(ids).logits, merged(ids).logits
    assert (expected - load_causal_lm("tiny:demo")(ids).logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_export_refuses_a_directory_without_an_adapter(tmp_path):
    assert_one_line_usage_error(rlhf("export", "--adapter", tmp_path, "--out", tmp_path / "o"),
                                "no adapter_config.json there", "rlhf export: ")


def test_env_lists_versions_and_devices():
    result = rlhf("env")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    import torch

    assert fields["torch"] == torch.__version__ and fields["python"].startswith(sys.version.split()[0])
    assert {"transformers", "trl", "peft", "accelerate", "deepspeed", "vllm", "devices"} <= set(fields)
