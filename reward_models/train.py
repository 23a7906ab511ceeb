"""Reward-model stage: a thin layer over ``trl.RewardTrainer``.

Our part: preference pairs in any supported format, rendered by ``scoring.pair_to_ids`` (the same
function the API and PPO score with) and handed to TRL pre-tokenized; pairs over ``max_length`` are
cut from the left of the prompt and counted instead of being dropped (TRL drops them silently); label
smoothing; the reward statistics stored with the model for normalization; held-out evaluation.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from transformers import set_seed
from trl import RewardTrainer

from rlhf.config import RewardScriptArguments, format_config, resolved_config, save_config
from rlhf.data.sources import resolve_stage_data
from rlhf.distributed import parallelism, process_state, whole_model_loading
from rlhf.tracking import init_wandb, log_summary

from .evaluation import calibration_plot, evaluate_pairs, print_report
from .scoring import RewardScorer, pair_to_ids, save_reward_stats


class SmoothedRewardTrainer(RewardTrainer):
    """RewardTrainer with label smoothing: loss = -(1-e) log s(d) - e log s(-d), d = r_c - r_r - margin."""

    def __init__(self, *args, label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if self.label_smoothing:
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            delta = chosen - rejected - inputs.get("margin", 0.0)
            e = self.label_smoothing
            loss = (-(1 - e) * torch.nn.functional.logsigmoid(delta) - e * torch.nn.functional.logsigmoid(-delta)).mean()
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        return (loss, outputs) if return_outputs else loss


def tokenize_pairs(tokenizer, pairs: list[dict], max_length: int | None, use_margin: bool) -> tuple[list[dict], int]:
    """Pre-tokenized rows for RewardTrainer, and how many pairs were truncated (none is dropped)."""
    rows, truncated = [], 0
    for pair in pairs:
        chosen, rejected, cut = pair_to_ids(tokenizer, pair, max_length)
        truncated += cut
        row = {"chosen_ids": chosen, "rejected_ids": rejected}
        if use_margin:
            if not isinstance(pair.get("margin"), int | float):
                raise ValueError("use_margin=true but a pair has no numeric `margin` field")
            row["margin"] = float(pair["margin"])
        rows.append(row)
    return rows, truncated


def load_reward_model(path: str, dtype: str | None, revision: str | None, trust_remote_code: bool):
    from transformers import AutoModelForSequenceClassification

    from rlhf.expected_noise import new_score_head_expected
    from rlhf.models import disable_dropout, ensure_pad_token, load_tokenizer, resolve_model_path
    from rlhf.paths import is_local_path

    path = resolve_model_path(path)
    if not os.path.exists(path) and is_local_path(path):
        raise FileNotFoundError(f"{path}: no such model directory (run the SFT stage first, or set model_name_or_path)")
    tokenizer = load_tokenizer(path, revision, trust_remote_code)
    with new_score_head_expected():  # a causal LM has no score head: the report of it missing is the point
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, revision=revision, trust_remote_code=trust_remote_code,
            dtype=None if dtype in (None, "auto") else getattr(torch, dtype),
        )
    ensure_pad_token(tokenizer, model)
    disable_dropout(model)
    return model, tokenizer


def reward_statistics(scorer: RewardScorer, rows: list[dict], batch_size: int = 64) -> tuple[float, float]:
    """Mean and standard deviation of the rewards of the training responses (chosen and rejected)."""
    sequences = [ids for row in rows for ids in (row["chosen_ids"], row["rejected_ids"])]
    rewards = []
    for start in range(0, len(sequences), batch_size):
        rewards += scorer.score_ids(sequences[start : start + batch_size])
    return statistics.fmean(rewards), (statistics.pstdev(rewards) or 1.0)


def run_reward(script_args: RewardScriptArguments, model_args, training_args) -> dict:
    from datasets import Dataset
    from trl import get_peft_config

    state = process_state()
    is_main = state.is_main_process
    config = resolved_config(script_args, model_args, training_args)
    if is_main:
        saved = save_config(config, training_args.output_dir)
        print(f"resolved config (saved as {saved}):\n{format_config(config)}")
    run = init_wandb(training_args.output_dir, script_args.wandb_project, script_args.wandb_group,
                     training_args.run_name or "reward", config, is_main) if "wandb" in (training_args.report_to or []) else None
    with state.main_process_first():
        train, held_out, _, report_lines = resolve_stage_data(script_args, "preference")
    set_seed(training_args.seed)  # the new score head: the same start under DDP, ZeRO-2 and ZeRO-3
    model, tokenizer = load_reward_model(model_args.model_name_or_path, model_args.dtype, model_args.model_revision,
                                         training_args.trust_remote_code)
    train_rows, train_cut = tokenize_pairs(tokenizer, train, training_args.max_length, script_args.use_margin)
    eval_rows, eval_cut = tokenize_pairs(tokenizer, held_out, training_args.max_length, script_args.use_margin)
    if is_main:
        print("\n".join(report_lines))
        print(f"pairs truncated from the left to max_length={training_args.max_length}: "
              f"train {train_cut} of {len(train_rows)}, eval {eval_cut} of {len(eval_rows)} (none dropped)")

    peft_config = None
    if script_args.finetune == "lora":
        model_args.use_peft, model_args.lora_task_type = True, "SEQ_CLS"
        peft_config = get_peft_config(model_args)
    trainer = SmoothedRewardTrainer(
        model=model, args=training_args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        label_smoothing=script_args.label_smoothing,
    )
    start = time.time()
    result = trainer.train()
    trainer.save_state()  # OUTPUT/trainer_state.json: the loss history the pipeline report plots
    metrics = {**parallelism(trainer.accelerator), "train_loss": result.training_loss, "train_seconds": time.time() - start,
               "truncated_pairs": train_cut + eval_cut, "train_pairs": len(train_rows), "eval_pairs": len(eval_rows),
               # what the optimiser saw: max_steps may stop before the end of the data
               "train_pairs_seen": min(len(train_rows) * max(1, int(training_args.num_train_epochs)),
                                       trainer.state.global_step * training_args.per_device_train_batch_size
                                       * training_args.gradient_accumulation_steps * trainer.accelerator.num_processes)}
    out = training_args.output_dir
    if script_args.finetune == "lora":  # keep the adapter, and serve/score a standard merged model
        trainer.save_model(os.path.join(out, "adapter"))
        if is_main:
            trainer.model.merge_and_unload().save_pretrained(out)
            tokenizer.save_pretrained(out)
    else:
        trainer.save_model(out)
    state.wait_for_everyone()
    if is_main:
        with whole_model_loading():  # this process alone scores: no ZeRO-3 partitioning
            # scored in the precision it trained in: bf16 runs ~4x fp32 on CPUs with AVX512-BF16
            scorer = RewardScorer(out, device=str(state.device), max_length=training_args.max_length,
                                  dtype="bfloat16" if training_args.bf16 else "float32")
        sample = train_rows[: script_args.stats_max_pairs]
        mean, std = reward_statistics(scorer, sample)
        save_reward_stats(out, mean, std, max_length=training_args.max_length)
        metrics.update({"reward_mean": mean, "reward_std": std, "eval_dtype": str(scorer.model.dtype).split(".")[-1]})
        if held_out:
            scorer.mean, scorer.std = mean, std  # the statistics just stored
            report = evaluate_pairs(scorer, held_out)
            metrics.update({f"eval/{k}": v for k, v in report["overall"].items()})
            print_report(report, title=f"held-out preference pairs ({len(held_out)})")
            calibration_plot(report, os.path.join(out, "calibration.png"))
            if run is not None:
                run.log({f"eval/{k}": v for k, v in report["overall"].items()})
        print(f"reward statistics on {2 * len(sample)} training responses: mean {mean:.4f}, std {std:.4f} "
              f"(stored in {out}/config.json)")
        with open(os.path.join(out, "reward_summary.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        log_summary(run, metrics)
        if run is not None:
            run.finish()
    return metrics
