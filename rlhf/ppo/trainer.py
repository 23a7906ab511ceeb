"""The PPO loop: rollout -> rewards and advantages -> epochs x minibatches -> optimiser step.

Each step: sample responses for ``batch_size`` prompts (split over processes), score them, shape the
rewards with the per-token KL penalty, estimate advantages with GAE, whiten them over the global batch,
then run ``ppo_epochs`` passes of clipped policy and value updates. Side effects (files, W&B, prints)
happen on the main process; statistics are global.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from tqdm.auto import tqdm

from ..checkpoint import Progress, latest_checkpoint, save_checkpoint
from ..distributed import (
    global_masked_mean_var,
    global_means,
    global_sum,
    make_accelerator,
    unwrap_for_generation,
)
from . import math as ppo_math
from .actor_critic import build_actor_critic, reference_logits
from .kl import make_kl_controller
from .rewards import gold_source, make_reward_source
from .rollout import Rollout, decode_responses, encode_prompts, forward_response, sample_responses


class PPOStopError(RuntimeError):
    """A guard stopped training (non-finite values, ratio check); the last checkpoint is intact."""


RATIO_CAUSES = (
    "dropout active in the policy, logprobs computed at a temperature other than the sampling one, "
    "padding or position ids that differ between rollout and training, a dtype/autocast mismatch between "
    "the rollout and training forward passes, or non-deterministic kernels"
)


class PPOTrainer:
    def __init__(self, cfg, prompts: list[list[dict]], tokenizer, ptx_examples: list[dict] | None = None):
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        self.cfg = cfg
        self.accelerator = acc = make_accelerator(cfg.gradient_accumulation_steps)
        self.sizes = cfg.derive(acc.num_processes)
        set_seed(cfg.seed, device_specific=True)  # each process samples differently, reproducibly
        self.tokenizer, self.prompts = tokenizer, prompts
        model, self.ref = build_actor_critic(cfg, tokenizer)
        groups = [{"params": model.policy_parameters(), "lr": cfg.learning_rate},
                  {"params": model.critic_parameters(), "lr": cfg.critic_learning_rate or cfg.learning_rate}]
        optimizer = torch.optim.AdamW(groups, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                      fused=acc.device.type in ("cpu", "cuda"))
        updates = cfg.total_steps * cfg.ppo_epochs * cfg.num_minibatches
        # stepped by hand on each real optimiser step: accelerate's prepared scheduler would step once per process
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, updates)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if self.ref is not None:
            self.ref.to(acc.device)
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        self.progress = Progress()
        for obj in (self.scheduler, self.kl_ctl, self.progress):
            acc.register_for_checkpointing(obj)
        self.reward_fn = make_reward_source(cfg, acc.device)
        self.gold_fn = gold_source(cfg.dataset)
        self.stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in (cfg.stop_tokens or [tokenizer.eos_token])]
        self.ptx = ptx_examples
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")

    # ------------------------------------------------------------------ data

    def step_prompts(self, step: int) -> list[list[dict]]:
        """This process's prompts for ``step``: a seeded permutation per pass over the prompt set."""
        n, b = len(self.prompts), self.cfg.batch_size
        out = []
        for position in range(step * b, (step + 1) * b):
            epoch, offset = divmod(position, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
            out.append(self.prompts[perm[offset]])
        local = self.sizes.local_batch_size
        rank = self.accelerator.process_index
        return out[rank * local : (rank + 1) * local]

    # ------------------------------------------------------------------ rollout

    def _model_fn(self, model):
        return lambda ids, mask, pos, keep: model(ids, mask, pos, keep)

    @torch.no_grad()
    def rollout(self, prompts) -> tuple[Rollout, dict]:
        acc, cfg, tok = self.accelerator, self.cfg, self.tokenizer
        unwrapped = acc.unwrap_model(self.model)
        timings = {}
        t = time.perf_counter()
        q_ids, q_mask, _ = encode_prompts(tok, prompts, cfg.max_prompt_length, acc.device)
        with unwrap_for_generation(self.model, acc) as bare:
            r_ids, r_mask, has_stop = sample_responses(bare.generation_model(), tok, q_ids, q_mask, cfg, self.stop_ids)
        timings["time/generate"] = time.perf_counter() - t
        t = time.perf_counter()
        logprobs, values, _ = forward_response(self._model_fn(unwrapped), q_ids, q_mask, r_ids, r_mask, cfg.temperature)
        ref_fn = lambda ids, mask, pos, keep: reference_logits(unwrapped, self.ref, ids, mask, pos, keep)  # noqa: E731
        ref_logprobs, _, _ = forward_response(ref_fn, q_ids, q_mask, r_ids, r_mask, cfg.temperature, with_values=False)
        timings["time/reference"] = time.perf_counter() - t
        t = time.perf_counter()
        texts = decode_responses(tok, r_ids, r_mask)
        raw = torch.tensor(self.reward_fn(prompts, texts), dtype=torch.float32, device=acc.device)
        timings["time/reward"] = time.perf_counter() - t
        scores = raw - cfg.missing_stop_penalty * (~has_stop).float()
        rollout = Rollout(q_ids, q_mask, r_ids, r_mask, has_stop, logprobs, ref_logprobs, values, scores, raw,
                          list(prompts), texts)
        return rollout, timings

    def advantages(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor, dict]:
        cfg, acc = self.cfg, self.accelerator
        mask = ro.response_mask.float()
        for name in ("scores", "logprobs", "ref_logprobs", "values"):
            if not torch.isfinite(getattr(ro, name) * (mask if name != "scores" else 1)).all():
                raise PPOStopError(f"non-finite {name} in the rollout of step {self.progress.step + 1}; stopping before "
                                   "the update (the last checkpoint is intact)")
        kl = ppo_math.kl_per_token(ro.logprobs, ro.ref_logprobs, cfg.kl_estimator) * mask
        rewards, non_score = ppo_math.shaped_rewards(ro.scores, kl, mask, self.kl_ctl.value)
        if cfg.whiten_rewards:
            rewards = ppo_math.whiten(rewards, mask, *global_masked_mean_var(acc, rewards, mask), shift_mean=False)
        adv, returns = ppo_math.gae(ro.values * mask, rewards, mask, cfg.gamma, cfg.lam)
        adv = ppo_math.whiten(adv, mask, *global_masked_mean_var(acc, adv, mask))
        stats = {
            "objective/kl": kl.sum(1).mean(),
            "objective/entropy": (-ro.logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score.sum(1).mean(),
            "objective/rlhf_reward": (ro.scores + non_score.sum(1)).mean(),
            "objective/scores": ro.scores.mean(),
            "objective/raw_scores": ro.raw_scores.mean(),
            "rollout/eos_rate": ro.has_stop.float().mean(),
            "rollout/response_length": mask.sum(1).mean(),
            "val/num_eos_tokens": ro.has_stop.float().sum(),
        }
        if self.gold_fn is not None:
            stats["objective/gold_reward"] = sum(self.gold_fn(ro.prompts, ro.responses)) / len(ro.responses)
        return adv, returns, stats

    # ------------------------------------------------------------------ update

    def train_on(self, ro: Rollout, adv: torch.Tensor, returns: torch.Tensor) -> dict:
        cfg, acc, sizes = self.cfg, self.accelerator, self.sizes
        self.model.train()
        sums: dict[str, float] = {}
        count, grad_norms = 0, []
        self._ptx_calls = 0
        for epoch in range(cfg.ppo_epochs):
            seed = ((cfg.seed * 1000003 + self.progress.step) * 101 + epoch) * 1009 + acc.process_index
            order = torch.randperm(sizes.local_batch_size, generator=torch.Generator().manual_seed(seed))
            for mb, start in enumerate(range(0, sizes.local_batch_size, sizes.local_minibatch_size)):
                minibatch = order[start : start + sizes.local_minibatch_size]
                for micro_start in range(0, len(minibatch), sizes.micro_batch_size):
                    idx = minibatch[micro_start : micro_start + sizes.micro_batch_size].to(acc.device)
                    stats = self._micro_step(ro.select(idx), adv[idx], returns[idx], check_ratio=epoch == 0 and mb == 0)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                    if acc.sync_gradients:
                        grad_norms.append(float(acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)))
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad()
        out = {k: v / count for k, v in sums.items()}
        out["train/grad_norm"] = sum(grad_norms) / max(1, len(grad_norms))
        return out

    def _micro_step(self, ro: Rollout, adv, returns, check_ratio: bool) -> dict:
        cfg, acc = self.cfg, self.accelerator
        mask = ro.response_mask.float()
        with acc.accumulate(self.model):
            logprobs, values, entropy = forward_response(self._model_fn(self.model), ro.query_ids, ro.query_mask,
                                                         ro.response_ids, ro.response_mask, cfg.temperature,
                                                         with_entropy="grad" if cfg.ent_coef else True)
            pg_loss, pg = ppo_math.policy_loss(logprobs, ro.logprobs, adv, mask, cfg.clip_range)
            if check_ratio and float(pg["ratio_max_dev"]) > cfg.ratio_check_tolerance:
                raise PPOStopError(
                    f"PPO ratio check failed at step {self.progress.step + 1}: on the first minibatch, before any update, "
                    f"max |pi_new/pi_old - 1| = {float(pg['ratio_max_dev']):.2e} > {cfg.ratio_check_tolerance:g}. "
                    f"Likely causes: {RATIO_CAUSES}.")
            vf_loss, vf = ppo_math.value_loss(values, ro.values, returns, mask, cfg.clip_range_value)
            mean_entropy = ppo_math.masked_mean(entropy, mask)
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * mean_entropy
            ptx_loss = self._ptx_loss() if self.ptx and cfg.ptx_coef > 0 else None
            if ptx_loss is not None:
                loss = loss + cfg.ptx_coef * ptx_loss
            if not torch.isfinite(loss):
                raise PPOStopError(f"non-finite loss at step {self.progress.step + 1} (policy {float(pg_loss)}, value "
                                   f"{float(vf_loss)}); stopping before the update (the last checkpoint is intact)")
            acc.backward(loss)
        stats = {
            "loss/policy_avg": pg_loss.item(), "loss/value_avg": vf_loss.item(),
            "policy/approxkl_avg": float(pg["approxkl"]), "policy/clipfrac_avg": float(pg["clipfrac"]),
            "policy/entropy_avg": mean_entropy.item(), "val/clipfrac_avg": float(vf["clipfrac"]),
            "val/ratio": float(pg["ratio_mean"]), "val/ratio_var": float(pg["ratio_var"]),
        }
        if ptx_loss is not None:
            stats["loss/ptx_avg"] = ptx_loss.item()
        return stats

    def _ptx_loss(self) -> torch.Tensor:
        """InstructGPT's PPO-ptx: next-token loss on demonstration assistant tokens, through the policy."""
        from .ptx import ptx_batch

        self._ptx_calls += 1
        ids, mask, labels = ptx_batch(self.tokenizer, self.ptx, self.cfg, self.progress.step, self._ptx_calls,
                                      self.accelerator.device)
        logits, _ = self.model(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100)

    # ------------------------------------------------------------------ loop

    def resume(self) -> None:
        path = latest_checkpoint(self.cfg.output_dir)
        if path is None:
            raise FileNotFoundError(f"resume=true but no checkpoint in {self.cfg.output_dir}/checkpoints")
        self.accelerator.load_state(path)
        if self.accelerator.is_main_process and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:  # forget steps after the checkpoint: they will be redone
                kept = [line for line in f if json.loads(line)["step"] <= self.progress.step]
            with open(self.metrics_path, "w") as f:
                f.writelines(kept)
        self.accelerator.print(f"resumed from {path} at step {self.progress.step}")

    def train(self, on_step=None) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        history = []
        bar = tqdm(total=cfg.total_steps, initial=self.progress.step, disable=not acc.is_main_process, desc="PPO")
        while self.progress.step < cfg.total_steps:
            t0 = time.perf_counter()
            ro, timings = self.rollout(self.step_prompts(self.progress.step))
            adv, returns, stats = self.advantages(ro)
            t = time.perf_counter()
            stats.update(self.train_on(ro, adv, returns))
            timings["time/train"] = time.perf_counter() - t
            timings["time/step"] = time.perf_counter() - t0
            mean_kl = global_means(acc, {"kl": stats["objective/kl"]})["kl"]
            self.kl_ctl.update(mean_kl, cfg.batch_size)
            metrics = global_means(acc, {**stats, **timings})
            generated = global_sum(acc, float(ro.response_mask.sum()))
            metrics["val/num_eos_tokens"] *= acc.num_processes  # a count, summed over processes
            self.progress.step += 1
            metrics.update({"step": self.progress.step, "episode": self.progress.step * cfg.batch_size,
                            "objective/kl_coef": self.kl_ctl.value, "train/lr": self.scheduler.get_last_lr()[0],
                            "throughput/tokens_per_s": generated / metrics["time/step"]})
            if not all(math.isfinite(v) for v in metrics.values()):
                raise PPOStopError(f"non-finite metric at step {self.progress.step}: the last checkpoint is intact")
            history.append(metrics)
            if on_step is not None:
                on_step(metrics, ro)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            if cfg.save_every and self.progress.step % cfg.save_every == 0:
                save_checkpoint(acc, cfg.output_dir, self.progress.step)
        bar.close()
        return history
