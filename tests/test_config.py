"""Stage configuration: YAML, then `key=value` / `--key value` overrides; unknown keys are errors."""

import pytest
from trl import ModelConfig, SFTConfig

from rlhf.config import SFTScriptArguments, normalize_overrides, parse_stage_args, resolved_config
from rlhf.errors import UsageError
from tests.conftest import REPO

SFT_TYPES = [SFTScriptArguments, ModelConfig, SFTConfig]
DEMO = str(REPO / "configs" / "demo" / "sft.yaml")


def test_overrides_in_both_styles_beat_the_yaml(tmp_path):
    script, model, train = parse_stage_args(
        SFT_TYPES, ["--config", DEMO, "num_train_epochs=1", "--learning_rate", "0.01", f"output_dir={tmp_path}"]
    )
    assert train.num_train_epochs == 1 and train.learning_rate == 0.01 and train.output_dir == str(tmp_path)
    assert model.model_name_or_path == "tiny:demo" and script.dataset == "demo"
    assert train.assistant_only_loss is True and train.bf16 is False  # from the YAML
    config = resolved_config(script, model, train)
    assert config["SFTConfig"]["learning_rate"] == 0.01 and config["SFTScriptArguments"]["finetune"] == "full"


def test_key_value_normalization_leaves_values_with_equals_alone():
    known = {"--a", "--b", "--config"}
    assert normalize_overrides(["a=1", "--b", "x=y", "--config", "c=d.yaml"], known) == ["--a", "1", "--b", "x=y", "--config", "c=d.yaml"]
    assert normalize_overrides(["--b", "a=2"], known) == ["--b", "--a", "2"]  # a known key wins


def test_unknown_yaml_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(DEMO).read() + "\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_stage_args(SFT_TYPES, ["--config", str(bad)])


def test_unknown_command_line_key_is_an_error():
    with pytest.raises(UsageError, match="unknown key 'no_such_key' on the command line"):
        parse_stage_args(SFT_TYPES, ["--config", DEMO, "no_such_key=1"])


def test_finetune_mode_is_validated():
    with pytest.raises(UsageError, match="invalid choice: 'qlora-ish'"):
        parse_stage_args(SFT_TYPES, ["--config", DEMO, "finetune=qlora-ish"])


def test_shipped_configs_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    from rlhf.paths import resolve_config

    monkeypatch.chdir(tmp_path)
    assert resolve_config("demo/ppo.yaml") == str(REPO / "configs" / "demo" / "ppo.yaml")
    assert resolve_config("configs/demo/ppo.yaml") == str(REPO / "configs" / "demo" / "ppo.yaml")
    local = tmp_path / "mine.yaml"
    local.write_text("max_steps: 3\n")
    assert resolve_config("mine.yaml") == str(local)  # a file of the user's wins
    with pytest.raises(FileNotFoundError, match="no such config file"):
        resolve_config("demo/nope.yaml")


def test_ppo_takes_trl_names_and_the_old_keys_warn_for_one_release():
    from rlhf.config import PPOConfig

    (cfg,) = parse_stage_args([PPOConfig], ["--config", str(REPO / "configs/demo/ppo.yaml"), "report_to=wandb"])
    assert cfg.max_steps == 24 and cfg.report_to == ["wandb"] and cfg.sample_period == 2
    with pytest.warns(FutureWarning, match="`total_steps` is deprecated .* use `max_steps`"):
        old = PPOConfig(total_steps=7, save_every=3, sample_every=2)
    assert (old.max_steps, old.save_steps, old.num_sample_generations) == (7, 3, 4)
    assert old.total_steps is None  # one place holds each value after parsing
    assert PPOConfig(report_to=["none"]).report_to == []
    with pytest.raises(ValueError, match="report_to"):
        PPOConfig(report_to=["wandbb"])


def test_every_stage_has_one_registry_entry_used_by_cli_pipeline_and_dry_run():
    from rlhf.cli import COMMANDS
    from rlhf.stages import STAGES

    assert list(STAGES) == ["sft", "reward", "ppo"]
    for name, stage in STAGES.items():
        assert name in COMMANDS
        parsed = stage.parse(["--config", f"demo/{name}.yaml", "use_cpu=true"] if name != "ppo"
                             else ["--config", "demo/ppo.yaml"])
        assert all(any(hasattr(p, key) for p in parsed) for key in stage.model_keys)
        assert set(stage.inputs.values()) <= set(STAGES)
