"""The PPO stage: config -> prompts -> trainer -> evaluation before and after -> saved policy and critic.

Logging: W&B (main process) with TRL's metric names, a local ``metrics.jsonl`` beside the outputs, a
sample table ``num_sample_generations`` times over the run, and a progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from tqdm.auto import tqdm

from ..config import format_config, resolved_config, save_config
from ..data.loading import load_records
from ..data.sources import resolve_stage_data
from ..distributed import (
    compute_precision,
    gathered,
    global_means,
    process_state,
    sharding_summary,
    unwrap_for_generation,
    zero_stage,
)
from ..evaluation import means, reply_figures, sequence_kl
from ..generation import generate_replies
from ..models import ensure_pad_token, load_tokenizer, resolve_model_path
from ..tracking import init_tracking, log_summary, log_table
from .actor_critic import reference_logits
from .trainer import PPOTrainer


@torch.no_grad()
def evaluate_policy(trainer: PPOTrainer, records: list[dict]) -> dict:
    """Held-out figures of the current policy: reward (the training reward sources), gold reward (demo),
    KL to the reference, reply length and EOS rate, at ``eval_temperature``. Prompts are split over
    processes and the figures averaged globally."""
    acc, cfg, tok = trainer.accelerator, trainer.cfg, trainer.tokenizer
    # the same number on every process: under ZeRO-3 and FSDP2 every forward is a collective
    records = records[: len(records) - len(records) % acc.num_processes][acc.process_index :: acc.num_processes]
    mine, columns = [r["prompt"] for r in records], [r.get("columns", {}) for r in records]
    sampling = dataclasses.replace(trainer.sampling, temperature=cfg.eval_temperature)
    with unwrap_for_generation(trainer.model, acc) as bare, compute_precision(acc):  # the training precision throughout
        gens = generate_replies(bare.generation_model(), tok, mine, sampling, seed=cfg.seed + acc.process_index,
                                max_prompt_length=cfg.max_prompt_length,
                                progress="held-out evaluation" if acc.is_main_process else None)
    unwrapped = acc.unwrap_model(trainer.model)
    with compute_precision(acc):
        kl = sequence_kl(lambda *a: unwrapped(*a)[0], lambda *a: reference_logits(unwrapped, trainer.ref, *a), tok,
                         gens, cfg.eval_temperature, cfg.max_prompt_length, device=acc.device)
        sources = {"reward": trainer.reward_fn, **({"gold_reward": trainer.gold_fn} if trainer.gold_fn else {})}
        keys = sorted({k for c in columns for k in c})
        figures = reply_figures(gens, sources, kl, {k: [c.get(k) for c in columns] for k in keys})
    return global_means(acc, means(figures))


def save_policy(trainer: PPOTrainer, tokenizer) -> None:
    """The policy (and critic) as standard model directories; whole weights are gathered first when they are
    sharded, a collective every process joins, and the main process writes."""
    acc, out = trainer.accelerator, trainer.cfg.output_dir
    model = acc.unwrap_model(trainer.model)
    if trainer.fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if acc.is_main_process:
            model.save(out, tokenizer, state_dict=full)
        return
    with gathered(trainer.model, acc):
        if acc.is_main_process:
            model.save(out, tokenizer)


def load_prompts(cfg) -> tuple[list[dict], list[dict], list[str]]:
    """(training, held-out, report lines): prompt records (``prompt`` and any extra ``columns``) from any
    supported format."""
    train, held_out, gold_prompts, lines = resolve_stage_data(cfg, "prompt")
    held_out = [{"prompt": p} for p in gold_prompts] if gold_prompts else held_out
    return train, held_out[: cfg.eval_prompts], lines


def load_ptx(cfg, tokenizer):
    if cfg.ptx_coef <= 0:
        return None
    from ..data.demo_task import demo_data_paths
    from .ptx import tokenize_demonstrations

    path = demo_data_paths(cfg.demo_seed)["sft_train"] if cfg.ptx_dataset in (None, "demo") else cfg.ptx_dataset
    records, _ = load_records(path, kind="sft")
    return tokenize_demonstrations(tokenizer, records, cfg.max_prompt_length + cfg.max_new_tokens)


def print_comparison(before: dict, after: dict, start_label: str = "SFT") -> None:
    print(f"{'held-out':<18}{start_label:>10}{'PPO':>10}")
    for key in ("gold_reward", "reward", "kl", "response_length", "eos_rate"):
        if key in before:
            print(f"{key:<18}{before[key]:>10.3f}{after[key]:>10.3f}")


def run_ppo(cfg) -> dict:
    state = process_state()
    with state.main_process_first():
        policy_path = resolve_model_path(cfg.model_name_or_path)
        train_prompts, eval_prompts, lines = load_prompts(cfg)
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    trainer = PPOTrainer(cfg, train_prompts, tokenizer, load_ptx(cfg, tokenizer))
    acc, is_main = trainer.accelerator, trainer.accelerator.is_main_process
    config = resolved_config(cfg)
    if is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        saved = save_config(config, cfg.output_dir)
        print(f"resolved config (saved as {saved}):\n{format_config(config)}")
        print("\n".join(lines))
        print(f"prompts: {len(train_prompts)} training, {len(eval_prompts)} held out; "
              f"per process: {trainer.sizes}")
    run = init_tracking(cfg.output_dir, cfg.report_to, cfg.wandb_project, cfg.wandb_group, cfg.run_name, config,
                        is_main)
    if cfg.resume:
        trainer.resume()
    before = evaluate_policy(trainer, eval_prompts)
    if is_main and not cfg.resume:
        with open(trainer.metrics_path, "w"):
            pass

    def on_step(metrics: dict, rollout) -> None:
        if not is_main:
            return
        with open(trainer.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if run is not None and metrics["step"] % cfg.logging_steps == 0:
            run.log(metrics, step=metrics["step"])
        if cfg.sample_period and metrics["step"] % cfg.sample_period == 0:
            rows = [[json.dumps(p, ensure_ascii=False), r, float(s)]
                    for p, r, s in zip(rollout.prompts, rollout.responses, rollout.scores)][: cfg.num_samples]
            log_table(run, "samples", ["prompt", "response", "score"], rows, step=metrics["step"])
            for _, r, s in rows[:2]:
                tqdm.write(f"[step {metrics['step']}] score {s:+.2f}: {r!r}")

    trainer.train(on_step)
    after = evaluate_policy(trainer, eval_prompts)
    acc.wait_for_everyone()
    start = "resumed" if cfg.resume else "sft"  # a resumed run starts from its checkpoint, not from SFT
    summary = {**{f"{start}/{k}": v for k, v in before.items()}, **{f"ppo/{k}": v for k, v in after.items()}}
    summary["parallelism"] = {"distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes,
                              "fsdp2": trainer.fsdp2, "zero_stage": zero_stage(acc),
                              **sharding_summary(acc.unwrap_model(trainer.model))}
    save_policy(trainer, tokenizer)
    if is_main:
        print_comparison(before, after, "resumed" if cfg.resume else "SFT")
        with open(os.path.join(cfg.output_dir, "ppo_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log_summary(run, summary)
        if run is not None:
            run.finish()
    acc.wait_for_everyone()
    return summary
