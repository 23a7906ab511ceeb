"""SFT stage: a thin layer over ``trl.SFTTrainer``.

Our part: data in any supported format (through ``rlhf.data``), the tiny demo model, full / LoRA /
partial fine-tuning, W&B set-up, sample generations at each evaluation, and on the demo task the gold
reward of the base and the SFT model on held-out prompts.
"""

from __future__ import annotations

import json
import logging
import os
import time

from transformers import TrainerCallback

from .config import SFTScriptArguments, format_config, resolved_config, save_config
from .data.demo_task import demo_data_paths, gold_rewards
from .data.sources import resolve_stage_data
from .distributed import parallelism, process_state, whole_model_loading
from .evaluation import means, reply_figures
from .generation import Sampling, generate_replies, stop_token_ids
from .models import (
    disable_dropout,
    ensure_pad_token,
    freeze_lower_layers,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)
from .tracking import init_wandb, log_summary, log_table

logger = logging.getLogger(__name__)


class SampleGenerationCallback(TrainerCallback):
    """Print and log a few generations on held-out prompts at every evaluation."""

    def __init__(self, tokenizer, prompts, max_new_tokens, run, is_main):
        self.tokenizer, self.prompts, self.max_new_tokens = tokenizer, prompts, max_new_tokens
        self.run, self.is_main = run, is_main

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not self.prompts or model is None:
            return
        # every process generates (sharded models need all ranks); only the main one reports
        greedy = Sampling(self.max_new_tokens, temperature=0, stop_token_ids=stop_token_ids(self.tokenizer))
        gens = generate_replies(model, self.tokenizer, self.prompts, greedy)
        if not self.is_main:
            return
        rows = [[json.dumps(p, ensure_ascii=False), r, e] for p, r, e in zip(gens.prompts, gens.responses, gens.has_stop)]
        for p, r, e in zip(gens.prompts, gens.responses, gens.has_stop):
            shown = " / ".join(m["content"] for m in p if m["role"] != "system")
            print(f"[sample step {state.global_step}] {shown!r} -> {r!r}{'' if e else ' (no EOS)'}")
        log_table(self.run, "samples", ["prompt", "response", "eos"], rows)


def build_trainer(script_args: SFTScriptArguments, model_args, training_args, run=None, is_main=True):
    from datasets import Dataset
    from trl import SFTTrainer, get_peft_config

    train, held_out, gold_prompts, report_lines = resolve_stage_data(script_args, "sft")
    if is_main:
        print("\n".join(report_lines))
    model_path = resolve_model_path(model_args.model_name_or_path)
    remote_code = training_args.trust_remote_code
    tokenizer = load_tokenizer(model_path, model_args.model_revision, remote_code)
    model = load_causal_lm(
        model_path, dtype=model_args.dtype, revision=model_args.model_revision,
        trust_remote_code=remote_code, attn_implementation=model_args.attn_implementation,
    )
    ensure_pad_token(tokenizer, model)
    disable_dropout(model)
    peft_config = None
    if script_args.finetune == "lora":
        model_args.use_peft = True
        peft_config = get_peft_config(model_args)
    elif model_args.use_peft:
        raise ValueError("use_peft=true conflicts with finetune=" + script_args.finetune + "; set finetune: lora")
    elif script_args.finetune == "partial":
        trainable, total = freeze_lower_layers(model, script_args.freeze_layers, script_args.train_top_layers)
        if is_main:
            print(f"partial fine-tuning: {trainable:,} of {total:,} parameters trainable")
    elif script_args.freeze_layers or script_args.train_top_layers:
        raise ValueError("freeze_layers / train_top_layers need finetune: partial")

    sample_prompts = [p for p in (gold_prompts or [_prompt(r) for r in held_out])][: script_args.num_sample_generations]
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(held_out) if held_out else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[SampleGenerationCallback(tokenizer, sample_prompts, script_args.max_new_tokens, run, is_main)],
    )
    dropped = len(train) - len(trainer.train_dataset)
    if dropped and is_main:  # TRL drops examples truncated down to no assistant token; say so
        print(f"warning: {dropped} of {len(train)} training conversations lost every assistant token to "
              f"truncation at max_length={training_args.max_length} and were dropped; raise max_length to keep them")
    return trainer, tokenizer, model_path, gold_prompts


def _prompt(record: dict) -> list[dict]:
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def evaluate_gold(model_path: str, prompts: list[list[dict]], args: SFTScriptArguments, seed: int) -> dict:
    """Gold reward of a saved model on held-out demo prompts (loaded from disk, as a user would)."""
    tokenizer = load_tokenizer(model_path)
    sampling = Sampling(args.max_new_tokens, args.eval_temperature, stop_token_ids=stop_token_ids(tokenizer))
    with whole_model_loading():  # this process alone loads and samples: no ZeRO-3 partitioning or synced_gpus
        model = load_causal_lm(model_path, dtype="float32")
        gens = generate_replies(model, tokenizer, prompts, sampling, seed=seed, progress=f"gold evaluation of {model_path}")
    figures = reply_figures(gens, {"gold_reward": gold_rewards})
    return {**means(figures), "n": len(prompts)}


def run_sft(script_args: SFTScriptArguments, model_args, training_args) -> dict:
    """The whole stage; returns its summary (also written to OUTPUT/sft_summary.json)."""
    state = process_state()
    is_main = state.is_main_process
    with state.main_process_first():  # build the tiny model / demo data once
        resolve_model_path(model_args.model_name_or_path)
        if script_args.dataset == "demo":
            demo_data_paths(script_args.demo_seed)
    config = resolved_config(script_args, model_args, training_args)
    if is_main:
        saved = save_config(config, training_args.output_dir)
        print(f"resolved config (saved as {saved}):\n{format_config(config)}")
    run = init_wandb(training_args.output_dir, script_args.wandb_project, script_args.wandb_group,
                     training_args.run_name or "sft", config, is_main) if "wandb" in (training_args.report_to or []) else None
    trainer, tokenizer, base_path, gold_prompts = build_trainer(script_args, model_args, training_args, run, is_main)

    start = time.time()
    train_result = trainer.train()
    trainer.save_state()  # OUTPUT/trainer_state.json: the loss history the pipeline report plots
    metrics = {**parallelism(trainer.accelerator), "train_loss": train_result.training_loss, "train_seconds": time.time() - start}
    eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    if eval_losses:
        metrics["eval_loss"] = eval_losses[-1]
    trainer.save_model(training_args.output_dir)
    final_path = training_args.output_dir
    if script_args.finetune == "lora" and script_args.merge_lora and is_main:
        final_path = os.path.join(training_args.output_dir, "merged")
        trainer.model.merge_and_unload().save_pretrained(final_path)
        tokenizer.save_pretrained(final_path)
    state.wait_for_everyone()

    if is_main and gold_prompts:
        prompts = gold_prompts[: script_args.gold_eval_prompts]
        before = evaluate_gold(base_path, prompts, script_args, training_args.seed)
        after = evaluate_gold(final_path, prompts, script_args, training_args.seed)
        metrics.update({f"gold/base_{k}": v for k, v in before.items()})
        metrics.update({f"gold/sft_{k}": v for k, v in after.items()})
        print(
            f"gold reward on {after['n']} held-out prompts: base {before['gold_reward']:.3f} "
            f"(EOS {before['eos_rate']:.0%}, {before['response_length']:.1f} tokens) -> "
            f"SFT {after['gold_reward']:.3f} (EOS {after['eos_rate']:.0%}, {after['response_length']:.1f} tokens)"
        )
    if is_main:
        with open(os.path.join(training_args.output_dir, "sft_summary.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        log_summary(run, metrics)
        if run is not None:
            run.finish()
    return metrics
