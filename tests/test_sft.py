"""The SFT stage end to end, as users run it: `accelerate launch scripts/sft.py --config ...`."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import ModelConfig, SFTConfig

from rlhf.config import SFTScriptArguments, parse_stage_args
from rlhf.models import resolve_model_path
from rlhf.sft import build_trainer
from tests.conftest import REPO, accelerate_launch, run_cli

DEMO = str(REPO / "configs" / "demo" / "sft.yaml")
SHORT = ["eval_strategy=no", "gold_eval_prompts=8", "report_to=none", "num_sample_generations=1"]
GOLD_LINE = re.compile(r"gold reward on (\d+) held-out prompts: base (-?[\d.]+) .* -> SFT (-?[\d.]+) \(EOS (\d+)%")


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def test_assistant_only_loss_masks_everything_but_assistant_turns(tmp_path):
    args = parse_stage_args([SFTScriptArguments, ModelConfig, SFTConfig],
                            ["--config", DEMO, f"output_dir={tmp_path}", "report_to=none", "max_records=50"])
    trainer, tokenizer, _, _ = build_trainer(*args)
    multi = next(r for r in trainer.train_dataset if r["input_ids"].count(tokenizer.convert_tokens_to_ids("<|user|>")) > 1)
    ids, mask = multi["input_ids"], [label != -100 for label in multi["labels"]]
    text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    # both assistant turns of the two-turn dialogue, each with its EOS, and nothing else
    assert text.count("<|end|>") == 2 and "Which item is it about?<|end|>" in text
    assert "<|user|>" not in text and "It is the" not in text
    assert tokenizer.decode([t for t, m in zip(ids, mask) if not m]).endswith("<|assistant|>")


@pytest.mark.slow
def test_demo_sft_beats_the_untrained_model_and_stops(demo_sft):
    out, log = demo_sft
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["gold/sft_n"] == summary["gold/base_n"] == 64
    assert summary["gold/sft_gold_reward"] > summary["gold/base_gold_reward"] + 1.0, summary
    assert summary["gold/sft_eos_rate"] >= 0.9 > summary["gold/base_eos_rate"]
    assert "sample step" in log  # the sample generations at each evaluation
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.pad_token_id != model.config.eos_token_id
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "W&B should have written an offline run"


@pytest.mark.slow
def test_lora_saves_a_peft_adapter_and_a_merged_model(tmp_path):
    out = tmp_path / "lora"
    _ok(accelerate_launch("sft.py", "--config", DEMO, f"output_dir={out}", "finetune=lora", "lora_r=8",
                          "merge_lora=true", "max_steps=8", "learning_rate=0.01", *SHORT))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    adapted = AutoModelForCausalLM.from_pretrained(out)  # transformers loads base + adapter
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:demo"))
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(adapted(x).logits, merged(x).logits, atol=1e-4)
        assert not torch.allclose(base(x).logits, merged(x).logits, atol=1e-4)


@pytest.mark.slow
def test_partial_finetuning_leaves_the_lower_layers_untouched(tmp_path):
    out = tmp_path / "partial"
    log = _ok(accelerate_launch("sft.py", "--config", DEMO, f"output_dir={out}", "finetune=partial",
                                "freeze_layers=1", "max_steps=5", *SHORT))
    assert "partial fine-tuning:" in log
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:demo")).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    lower = [k for k in base if ".layers.0." in k]
    upper = [k for k in base if ".layers.1." in k]
    assert lower and all(torch.equal(base[k], tuned[k]) for k in lower)
    assert any(not torch.equal(base[k], tuned[k]) for k in upper)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_run_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    log = _ok(accelerate_launch("sft.py", "--config", DEMO, f"output_dir={out}", "max_steps=4", *SHORT,
                                num_processes=2))
    assert len(GOLD_LINE.findall(log)) == 1  # reports come from the main process only
    assert log.count("resolved config (saved as") == 1  # printed (and saved) by the main process only
    assert (out / "model.safetensors").exists()


def test_bad_data_stops_with_file_record_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": 3}]}\n')
    result = accelerate_launch("sft.py", "--config", DEMO, f"output_dir={tmp_path / 'o'}", f"dataset={bad}", *SHORT)
    assert result.returncode != 0
    assert f"{bad}:record 2" in result.stderr and "content" in result.stderr


def test_rlhf_help_lists_the_subcommands():
    result = run_cli(["-m", "rlhf", "--help"])
    assert result.returncode == 0
    for command in ("data", "sft", "demo"):
        assert command in result.stdout
