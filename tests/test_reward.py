"""The reward-model stage: rendering shared with scoring, truncation, loss options, demo accuracy, real data."""

import json
import math
import re

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig

from reward_models.scoring import REWARD_MEAN_KEY, REWARD_STD_KEY, RewardScorer, TooLong, render_item
from reward_models.train import SmoothedRewardTrainer, load_reward_model, tokenize_pairs
from rlhf.data import load_records
from rlhf.data.demo_task import demo_data_paths
from rlhf.models import resolve_model_path
from tests.conftest import REPO, SHARED_DATA, accelerate_launch, run_cli

REWARD_YAML = str(REPO / "configs" / "demo" / "reward.yaml")
ACCURACY = re.compile(r"^overall\s+(\d+)\s+([\d.]+)\s+(-?[\d.]+)", re.M)


def _args(path, **overrides) -> RewardConfig:
    return RewardConfig(output_dir=str(path), report_to="none", bf16=False, activation_checkpointing=False, **overrides)


@pytest.fixture(scope="module")
def untrained_rm(tmp_path_factory):
    """A tiny sequence-classification model (random score head): enough to test plumbing."""
    out = tmp_path_factory.mktemp("rm")
    model, tokenizer = load_reward_model("tiny:demo", None, None, False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def demo_pairs():
    return load_records(demo_data_paths(0)["pairs_eval"], kind="preference")[0][:40]


def test_training_rows_are_exactly_what_the_scorer_renders(untrained_rm, demo_pairs):
    scorer = RewardScorer(str(untrained_rm), device="cpu")
    rows, truncated = tokenize_pairs(scorer.tokenizer, demo_pairs, max_length=256, use_margin=False)
    assert truncated == 0
    # what TRL trains on: pre-tokenized rows pass through RewardTrainer's dataset preparation untouched
    trainer = SmoothedRewardTrainer(model=scorer.model, processing_class=scorer.tokenizer,
                                    args=_args(untrained_rm / "t", max_length=256),
                                    train_dataset=Dataset.from_list(rows))
    for pair, row in zip(demo_pairs, trainer.train_dataset):
        item = {"prompt": pair["prompt"], "response": pair["chosen"][0]["content"]}
        assert row["chosen_ids"] == scorer.render(item).input_ids
        assert row["rejected_ids"] == scorer.render({**item, "response": pair["rejected"][0]["content"]}).input_ids
        assert row["chosen_ids"][-1] == scorer.tokenizer.eos_token_id  # the reward is read at EOS
    # the three item shapes agree when they describe the same text
    text = scorer.tokenizer.apply_chat_template(demo_pairs[0]["prompt"] + demo_pairs[0]["chosen"], tokenize=False)
    as_text = render_item(scorer.tokenizer, {"text": text}, 256).input_ids
    as_messages = render_item(scorer.tokenizer, {"messages": demo_pairs[0]["prompt"] + demo_pairs[0]["chosen"]}, 256).input_ids
    assert as_text == as_messages == trainer.train_dataset[0]["chosen_ids"]


def test_long_pairs_are_cut_from_the_left_and_never_dropped(untrained_rm, demo_pairs):
    scorer = RewardScorer(str(untrained_rm), device="cpu")
    long_pair = {**demo_pairs[0], "prompt": [{"role": "user", "content": "please " * 300}] + demo_pairs[0]["prompt"]}
    rows, truncated = tokenize_pairs(scorer.tokenizer, [long_pair, demo_pairs[1]], max_length=64, use_margin=False)
    assert truncated == 1 and len(rows) == 2
    full = render_item(scorer.tokenizer, {"messages": long_pair["prompt"] + long_pair["chosen"]}, None).input_ids
    assert rows[0]["chosen_ids"] == full[-64:]  # the response's end, where the reward is read, survives
    with pytest.raises(TooLong, match="over the model's limit of 64"):
        render_item(scorer.tokenizer, {"messages": long_pair["prompt"] + long_pair["chosen"]}, 64)


def test_label_smoothing_loss_matches_the_formula(untrained_rm, demo_pairs):
    scorer = RewardScorer(str(untrained_rm), device="cpu")
    rows, _ = tokenize_pairs(scorer.tokenizer, demo_pairs[:4], 256, use_margin=False)
    args = _args(untrained_rm / "t", center_rewards_coefficient=0.05)
    trainer = SmoothedRewardTrainer(model=scorer.model, processing_class=scorer.tokenizer, args=args,
                                    train_dataset=Dataset.from_list(rows), label_smoothing=0.2)
    batch = trainer.data_collator(rows)
    loss, outputs = trainer.compute_loss(scorer.model, dict(batch), return_outputs=True)
    chosen, rejected = outputs.logits.squeeze(-1).chunk(2)
    d = chosen - rejected
    expected = (-(0.8) * torch.nn.functional.logsigmoid(d) - 0.2 * torch.nn.functional.logsigmoid(-d)).mean()
    expected = expected + 0.05 * ((chosen + rejected) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_margin_option_requires_a_margin_field(untrained_rm, demo_pairs):
    scorer = RewardScorer(str(untrained_rm), device="cpu")
    rows, _ = tokenize_pairs(scorer.tokenizer, [{**demo_pairs[0], "margin": 1.5}], 256, use_margin=True)
    assert rows[0]["margin"] == 1.5
    with pytest.raises(ValueError, match="margin"):
        tokenize_pairs(scorer.tokenizer, demo_pairs[:1], 256, use_margin=True)


@pytest.mark.slow
def test_demo_reward_model_reaches_85_percent_against_gold(demo_reward):
    out, _ = demo_reward
    summary = json.loads((out / "reward_summary.json").read_text())
    assert summary["eval/n"] >= 300 and summary["eval/accuracy"] >= 0.85, summary
    assert summary["truncated_pairs"] == 0 and summary["eval_pairs"] == summary["eval/n"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    scorer = RewardScorer(str(out), device="cpu")  # a standard sequence-classification model + stats
    assert scorer.std == config[REWARD_STD_KEY] > 0 and scorer.mean == config[REWARD_MEAN_KEY]
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(out), torch.nn.Module)


@pytest.mark.slow
def test_eval_rm_cli_prints_accuracy_subsets_and_writes_a_calibration_plot(demo_reward, tmp_path):
    out, _ = demo_reward
    paths = demo_data_paths(0)
    result = run_cli(["-m", "rlhf", "eval-rm", "--model", str(out), "--data", paths["pairs_eval"],
                      paths["pairs_train"], "--max-records", "200", "--max-length", "40", "--output-dir",
                      str(tmp_path), "--json"], cwd=tmp_path.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preferences_eval.jsonl" in result.stdout and "preferences_train.jsonl" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["overall"]["n"] == 400 and figures["subsets"]["preferences_eval.jsonl"]["accuracy"] >= 0.85
    assert (tmp_path / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "eval_rm.json").read_text())["overall"]["n"] == 400
    assert not (tmp_path.parent / "calibration.png").exists()  # nothing in the working directory
    assert 0 < figures["truncated_pairs"] < 400  # demo pairs run 30-60 tokens: a 40-token cap cuts some
    assert f"pairs truncated from the left to max_length=40: {figures['truncated_pairs']} of 400" in result.stdout


@pytest.mark.slow
def test_hh_rlhf_trains_and_evaluates_without_losing_a_pair(tmp_path):
    data = SHARED_DATA / "hh-rlhf" / "helpful-online-test.jsonl.gz"
    out = tmp_path / "hh"
    result = accelerate_launch("reward.py", "--config", REWARD_YAML, f"output_dir={out}", "model_name_or_path=tiny:demo",
                               f"dataset={data}", "max_records=300", "eval_fraction=0.2", "num_train_epochs=1",
                               "max_length=128", "report_to=none", timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    kept = int(re.search(r"read=300 kept=(\d+)", log).group(1))
    summary = json.loads((out / "reward_summary.json").read_text())
    assert summary["train_pairs"] + summary["eval_pairs"] == kept  # truncated, never dropped
    assert summary["truncated_pairs"] > 0
    n, accuracy, _ = ACCURACY.search(log).groups()
    assert int(n) == summary["eval_pairs"] and 0.0 <= float(accuracy) <= 1.0 and not math.isnan(float(accuracy))


@pytest.mark.slow
def test_lora_reward_model_is_saved_as_a_standard_model_plus_adapter(tmp_path):
    out = tmp_path / "lora_rm"
    result = accelerate_launch("reward.py", "--config", REWARD_YAML, f"output_dir={out}",
                               f"model_name_or_path={resolve_model_path('tiny:demo')}", "finetune=lora", "max_steps=4",
                               "max_records=64", "eval_strategy=no", "report_to=none", "label_smoothing=0.1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "adapter" / "adapter_config.json").exists()
    summary = json.loads((out / "reward_summary.json").read_text())
    # 4 steps x the demo config's 32 pairs, fewer than the 3 epochs over the pairs would have seen
    assert summary["train_pairs_seen"] == 4 * 32 < summary["train_pairs"] * 3
    assert RewardScorer(str(out), device="cpu").score([{"text": "hello"}])[0]["tokens"] > 1
