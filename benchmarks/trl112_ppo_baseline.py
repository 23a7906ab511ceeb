"""The baseline of ``ppo_throughput.py``: ``trl==1.12.0``'s PPOTrainer on the same setting, timed the same way.

Runs in the separate ``.venv-trl112`` virtual environment (trl 1.12 is not a dependency of this project):

    .venv-trl112/bin/python benchmarks/trl112_ppo_baseline.py SPEC.json

``SPEC.json`` is written by ``ppo_throughput.py``: the policy/reference directory (the tiny demo Llama),
the reward and value model directory (a sequence-classification head on the same tiny model), the
prompts already chat-templated and tokenised, and the PPO settings. Prints one JSON line (last line of
stdout) with per-step timings, generated tokens and the process's peak RSS.

Mapping to TRL's PPOConfig: per_device_train_batch_size=16 and gradient_accumulation_steps=1 (one rollout
batch of 16), num_mini_batches=1, num_ppo_epochs=4, response_length=24, stop_token="eos",
missing_eos_penalty, temperature, kl_coef, vf_coef, cliprange(_value), gamma, lam, learning_rate,
adam_epsilon, total_episodes = 16 x (warm-up + timed steps), num_sample_generations=0, report_to none,
no saving, fp32 on CPU. TRL does not clip gradients in its PPO loop (our trainer clips at 1.0).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_models(spec: dict):
    """Policy, reference, reward and value models from the directories ``ppo_throughput.py`` saved.

    If this transformers cannot read them, equivalent models (same config: architecture and sizes; fresh
    random weights) are built from their config.json instead, and the returned note says so.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(spec["seed"])
    try:
        policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
        reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1,
                                                                    dtype=torch.float32)
        value = AutoModelForSequenceClassification.from_pretrained(spec["value_model"], num_labels=1,
                                                                   dtype=torch.float32)
        return policy, ref, reward, value, ""
    except Exception as err:  # noqa: BLE001 - any load failure: rebuild from the configs
        note = f"TRL side: saved weights unreadable ({type(err).__name__}); same-config models, random weights"
    config = AutoConfig.from_pretrained(spec["policy"])
    policy = AutoModelForCausalLM.from_config(config)
    ref = AutoModelForCausalLM.from_config(config)
    ref.load_state_dict(policy.state_dict())
    rm_config = AutoConfig.from_pretrained(spec["reward_model"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_config(rm_config)
    value = AutoModelForSequenceClassification.from_config(rm_config)
    value.load_state_dict(reward.state_dict())
    return policy, ref, reward, value, note


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    try:
        import trl.experimental.ppo.ppo_trainer as ppo_module
        from trl.experimental.ppo import PPOConfig, PPOTrainer  # trl >= 1.0
    except ImportError:  # older layout
        import trl.trainer.ppo_trainer as ppo_module
        from trl import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
    tokenizer.padding_side = "left"  # TRL's PPO expects left-padded queries
    policy, ref, reward, value, note = load_models(spec)
    steps = spec["warmup"] + spec["steps"]
    batch = spec["batch_size"]
    dataset = Dataset.from_dict({"input_ids": spec["prompt_ids"]})

    args = PPOConfig(
        output_dir=spec["output_dir"] + "_trl",
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=spec["num_minibatches"],
        num_ppo_epochs=spec["ppo_epochs"], local_rollout_forward_batch_size=batch,
        response_length=spec["max_new_tokens"], stop_token="eos", missing_eos_penalty=spec["missing_eos_penalty"],
        temperature=spec["temperature"], kl_coef=spec["kl_coef"], kl_estimator="k1", vf_coef=spec["vf_coef"],
        cliprange=spec["clip_range"], cliprange_value=spec["clip_range_value"], gamma=spec["gamma"], lam=spec["lam"],
        learning_rate=spec["learning_rate"], adam_epsilon=spec["adam_eps"], lr_scheduler_type="linear",
        total_episodes=batch * steps, num_sample_generations=0, report_to="none", save_strategy="no",
        logging_steps=1, seed=spec["seed"], use_cpu=True, bf16=False, fp16=False,
        dataloader_num_workers=0,
    )

    stamps: list[float] = []
    cpu: list[float] = []
    tokens: list[float] = []
    pending: list[float] = [0.0]

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            tokens.append(pending[0])
            pending[0] = 0.0

    original_truncate = ppo_module.truncate_response

    def counting_truncate(stop_token_id, pad_token_id, responses):
        # response tokens up to and including the first stop token (all of them when there is none)
        first = ppo_module.first_true_indices(responses == stop_token_id)
        pending[0] += float(torch.clamp(first + 1, max=responses.shape[1]).sum())
        return original_truncate(stop_token_id, pad_token_id, responses)

    ppo_module.truncate_response = counting_truncate
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[StepTimer()])
    rss_loaded = peak_rss_mb()
    trainer.train()

    durations = [b - a for a, b in zip(stamps, stamps[1:])][spec["warmup"]:]
    cpu_s = [b - a for a, b in zip(cpu, cpu[1:])][spec["warmup"]:]
    kept_tokens = tokens[spec["warmup"]:]
    print(json.dumps({
        "system": "trl",
        "step_s": durations,
        "cpu_s": cpu_s,
        "median_cpu_s_per_step": statistics.median(cpu_s),
        "median_s_per_step": statistics.median(durations),
        "mean_s_per_step": statistics.fmean(durations),
        "steps_per_s": 1 / statistics.median(durations),
        "gen_tokens_per_s": statistics.fmean(kept_tokens) / statistics.median(durations),  # per median step
        "mean_response_tokens": sum(kept_tokens) / len(kept_tokens) / batch,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_load_mb": rss_loaded,
        "torch_threads": torch.get_num_threads(),
        "versions": {"trl": trl.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "note": note,
    }))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
