"""Stage configuration: YAML, then `key=value` / `--key value` overrides; unknown keys are errors."""

import pytest
from trl import ModelConfig, SFTConfig

from rlhf.config import SFTScriptArguments, normalise_overrides, parse_stage_args, resolved_config
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


def test_key_value_normalisation_leaves_values_with_equals_alone():
    known = {"--a", "--b", "--config"}
    assert normalise_overrides(["a=1", "--b", "x=y", "--config", "c=d.yaml"], known) == ["--a", "1", "--b", "x=y", "--config", "c=d.yaml"]
    assert normalise_overrides(["--b", "a=2"], known) == ["--b", "--a", "2"]  # a known key wins


def test_unknown_yaml_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(DEMO).read() + "\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_stage_args(SFT_TYPES, ["--config", str(bad)])


def test_unknown_command_line_key_is_an_error():
    with pytest.raises((ValueError, SystemExit)):
        parse_stage_args(SFT_TYPES, ["--config", DEMO, "no_such_key=1"])


def test_finetune_mode_is_validated():
    with pytest.raises(SystemExit):
        parse_stage_args(SFT_TYPES, ["--config", DEMO, "finetune=qlora-ish"])
