"""The PPO loop. ``PPOTrainer.step()`` is the algorithm, numbered as in the README; everything else here
(building, data order, the optimiser step, reduction, checkpoints) is plumbing behind small helpers.

Side effects (files, W&B, prints) happen on the main process; statistics are global (docs/design.md).
"""

from __future__ import annotations

import json
import os

import torch
from tqdm.auto import tqdm

from ..checkpoint import Progress, latest_checkpoint, save_checkpoint
from ..distributed import (
    compute_precision,
    fsdp2_requested,
    global_masked_mean_var,
    global_means,
    global_sum,
    global_sums,
    make_accelerator,
    process_state,
    shard_fsdp2,
    unwrap_for_generation,
    zero_stage,
)
from ..generation import Sampling, decode_responses, encode_prompts, generate, stop_token_ids
from ..tensors import seeded_generator
from . import guards
from .actor_critic import build_actor_critic, reference_logits
from .advantages import gae, group_advantages, rewards_to_go, shaped_rewards
from .kl import kl_per_token, make_kl_controller
from .losses import Normalizer, aggregate_loss, policy_loss, value_loss
from .masked import masked_mean, whiten
from .metrics import PhaseTimer, RunningMeans, rollout_statistics
from .rewards import RewardSourceError, gold_source, make_reward_source
from .rollout import Rollout, forward_response

PPOStopError = guards.PPOStopError  # re-exported: callers catch it from here


class PPOTrainer:
    def __init__(self, cfg, prompts: list[list[dict]], tokenizer, ptx_examples: list | None = None):
        from accelerate.utils import set_seed

        self.cfg, self.tokenizer, self.prompts, self.ptx = cfg, tokenizer, prompts, ptx_examples
        state = process_state()  # first: it decides the process group and this process's device
        if fsdp2_requested():  # every process loads whole weights and fully_shard keeps its shard; transformers'
            # RAM-efficient loading would leave the other ranks on the meta device for accelerate to fill
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        sizes = cfg.derive(state.num_processes)
        set_seed(cfg.seed + state.process_index)  # each process samples differently, reproducibly
        # models before the Accelerator: under ZeRO-3 anything loaded after it is partitioned at load time, and
        # the pad-token resize and the critic's head scaling need whole tensors; prepare() shards them after
        model, ref = build_actor_critic(cfg, tokenizer)
        self.reward_fn = make_reward_source(cfg, state.device)  # an in-process RM: a full copy per process
        self.accelerator = make_accelerator(cfg.gradient_accumulation_steps, cfg.mixed_precision,
                                            sizes.micro_batch_size, cfg.max_grad_norm)
        self.sizes = cfg.derive(self.accelerator.num_processes)
        self.model, self.optimizer, self.scheduler = self.prepare(model)
        self.ref = self.place_reference(ref)
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        self.progress = Progress()
        for obj in (self.scheduler, self.kl_ctl, self.progress):
            self.accelerator.register_for_checkpointing(obj)
        self.gold_fn = gold_source(cfg.dataset)
        self.sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                                 stop_token_ids(tokenizer, cfg.stop_tokens))
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")

    # ------------------------------------------------------------------ the algorithm

    def step(self) -> dict:
        """One step on this process's share of ``batch_size`` prompts; returns the global metrics."""
        cfg, acc, n = self.cfg, self.accelerator, self.progress.step + 1
        timer = PhaseTimer()
        with timer("time/step"):
            # 1. Rollout: sample samples_per_prompt replies to each prompt, cut after the first stop token (detail 6)
            with timer("time/generate"):
                ro = self.rollout(self.step_prompts(self.progress.step))
            # 1b. Recompute, with the training model, the policy's logprobs at the sampling temperature,
            #     the critic's values (GAE only) and the reference's logprobs of the sampled tokens (detail 4)
            with timer("time/reference"):
                ro.logprobs, ro.values, ro.ref_logprobs = self.logprobs_and_values(ro)
            # 2. Score: the reward sources read the decoded replies; no stop token costs a penalty
            with timer("time/reward"), compute_precision(acc):  # an in-process RM scores in the policy's precision
                ro.raw_scores = self.score(ro, n)
            ro.scores = ro.raw_scores - cfg.missing_stop_penalty * (~ro.has_stop).float()
            mask = ro.response_mask.float()
            guards.check_rollout(n, mask, scores=ro.scores, logprobs=ro.logprobs, ref_logprobs=ro.ref_logprobs,
                                 **({"values": ro.values} if ro.values is not None else {}))
            # 3. Shape the rewards: -beta * KL(policy || reference) on every token when the KL goes in the
            #    reward (else it is a loss term in 5, or nowhere), the score added on the last real token (7, 8)
            kl = kl_per_token(ro.logprobs, ro.ref_logprobs, cfg.kl_estimator) * mask
            beta = self.kl_ctl.value if cfg.kl_penalty == "reward" else 0.0
            rewards, non_score = shaped_rewards(ro.scores, kl, mask, beta)
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, *global_masked_mean_var(acc, rewards, mask), shift_mean=False)
            # 4. Advantages: GAE whitened over the global batch (detail 9), or a critic-free estimator
            advantages, returns = self.estimate_advantages(ro, rewards, mask)
            # 5. Update: ppo_epochs passes over the batch in num_minibatches optimiser steps, each in
            #    micro-batches; clipped policy loss (+ value loss, + KL loss) (details 5, 10)
            with timer("time/train"):
                update = self.update(ro, advantages, returns)
            # 6. KL coefficient: the adaptive controller moves beta towards kl_target
            self.kl_ctl.update(global_means(acc, {"kl": kl.sum(1).mean()})["kl"], cfg.batch_size)
        self.progress.step, self.last_rollout = n, ro
        stats = {**rollout_statistics(ro, kl, non_score, mask), **self.reward_fn.last, **update}
        return self.reduce_metrics(ro, stats, timer)

    def estimate_advantages(self, ro: Rollout, rewards: torch.Tensor, mask: torch.Tensor):
        """(advantages, returns) by ``advantage_estimator`` (docs/design.md, "Advantage estimators")."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.advantage_estimator == "gae":
            advantages, returns = gae(ro.values * mask, rewards, mask, cfg.gamma, cfg.lam)
            return whiten(advantages, mask, *global_masked_mean_var(acc, advantages, mask)), returns
        if cfg.advantage_estimator == "reinforce_pp":  # per-token KL in the reward, returns whitened globally
            returns = rewards_to_go(rewards, mask, cfg.gamma)
            return whiten(returns, mask, *global_masked_mean_var(acc, returns, mask)), returns
        # group estimators compare the replies to one prompt by their sequence reward (KL summed in, if any)
        advantages = group_advantages(rewards.sum(1), ro.groups, mask, cfg.advantage_estimator)
        return advantages, advantages

    def update(self, ro: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict:
        cfg, sizes = self.cfg, self.sizes
        self.model.train()
        means, self._ptx_calls = RunningMeans(), 0
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(sizes.local_batch_size, generator=seeded_generator(
                cfg.seed, "minibatches", self.progress.step, epoch, self.accelerator.process_index))
            for first, start in enumerate(range(0, sizes.local_batch_size, sizes.local_minibatch_size)):
                minibatch = order[start : start + sizes.local_minibatch_size]
                norm = self.loss_normalizer(ro.response_mask[minibatch.to(ro.response_mask.device)])
                for micro in minibatch.split(sizes.micro_batch_size):
                    means.add(self.micro_step(ro.select(micro), advantages[micro], returns[micro], norm,
                                              check_ratio=epoch == 0 and first == 0))
                    if self.accelerator.sync_gradients:
                        means.add(self.optimizer_step())
        return means.means()

    def micro_step(self, mb: Rollout, advantages, returns, norm: Normalizer, check_ratio: bool) -> dict:
        """Forward and backward of one micro-batch (the optimiser steps once per minibatch): its losses are its
        share of the minibatch-wide ``loss_agg_mode`` mean, whatever the micro-batch size or process count."""
        cfg, acc, n = self.cfg, self.accelerator, self.progress.step + 1
        mask = mb.response_mask.float()
        with acc.accumulate(self.model):
            logprobs, values, entropy = forward_response(self.model, mb.query_ids, mb.query_mask, mb.response_ids,
                                                         mb.response_mask, cfg.temperature,
                                                         with_entropy="grad" if cfg.ent_coef else True)
            pg_loss, pg = policy_loss(logprobs, mb.logprobs, advantages, mask, cfg.clip_range, cfg.clip_range_high,
                                      cfg.loss_agg_mode, norm)
            if check_ratio:
                guards.check_first_ratio(n, float(pg["ratio_max_dev"]), cfg.ratio_check_tolerance)
            mean_entropy = masked_mean(entropy, mask)
            loss = pg_loss - cfg.ent_coef * mean_entropy
            losses = {"policy": pg_loss}
            if values is not None:
                losses["value"], vf = value_loss(values, mb.values, returns, mask, cfg.clip_range_value,
                                                 cfg.loss_agg_mode, norm)
                loss = loss + cfg.vf_coef * losses["value"]
            if cfg.kl_penalty == "loss":  # GRPO-style: KL to the reference as a loss term, through the new logprobs
                kl = kl_per_token(logprobs, mb.ref_logprobs, cfg.kl_estimator)
                losses["kl"] = aggregate_loss(kl, mask, cfg.loss_agg_mode, norm)
                loss = loss + self.kl_ctl.value * losses["kl"]
            ptx_loss = self.ptx_loss() if self.ptx and cfg.ptx_coef > 0 else None
            if ptx_loss is not None:
                loss = loss + cfg.ptx_coef * ptx_loss
            guards.check_loss(n, loss, **losses)
            acc.backward(loss)
        stats = {f"loss/{name}_avg": value.item() for name, value in losses.items()}
        stats.update({
            "policy/approxkl_avg": float(pg["approxkl"]), "policy/clipfrac_avg": float(pg["clipfrac"]),
            "policy/entropy_avg": mean_entropy.item(), "val/ratio": float(pg["ratio_mean"]),
            "val/ratio_var": float(pg["ratio_var"]),
        })
        if values is not None:
            stats["val/clipfrac_avg"] = float(vf["clipfrac"])
        if ptx_loss is not None:
            stats["loss/ptx_avg"] = ptx_loss.item()
        return stats

    # ------------------------------------------------------------------ rollout plumbing

    def step_prompts(self, step: int) -> list[dict]:
        """This process's prompt records for ``step``: a seeded permutation per pass over the prompt set."""
        n, b = len(self.prompts), self.cfg.batch_size
        out = []
        for position in range(step * b, (step + 1) * b):
            epoch, offset = divmod(position, n)
            perm = torch.randperm(n, generator=seeded_generator(self.cfg.seed, "prompts", epoch))
            out.append(self.prompts[perm[offset]])
        local, rank = self.sizes.local_prompts, self.accelerator.process_index
        return out[rank * local : (rank + 1) * local]

    @torch.no_grad()
    def rollout(self, records: list[dict]) -> Rollout:
        """``samples_per_prompt`` replies to each prompt (a group: consecutive rows, one group id), sampled
        under the training forward's precision (bf16 autocast when mixed precision is on)."""
        acc, tok, k = self.accelerator, self.tokenizer, self.cfg.samples_per_prompt
        records = [r for r in records for _ in range(k)]
        prompts = [r["prompt"] for r in records]
        q_ids, q_mask, _ = encode_prompts(tok, prompts, self.cfg.max_prompt_length, acc.device)
        with unwrap_for_generation(self.model, acc) as bare, compute_precision(acc):
            r_ids, r_mask, has_stop = generate(bare.generation_model(), q_ids, q_mask, self.sampling, tok.pad_token_id)
        groups = torch.arange(len(records), device=acc.device) // k
        return Rollout(q_ids, q_mask, r_ids, r_mask, has_stop, prompts, decode_responses(tok, r_ids, r_mask),
                       groups=groups, columns=[r.get("columns", {}) for r in records])

    def score(self, ro: Rollout, step: int) -> torch.Tensor:
        """The reward of every reply; a failing source stops the step, named (the last checkpoint is intact)."""
        keys = sorted({k for c in ro.columns for k in c})
        try:
            scores = self.reward_fn(ro.prompts, ro.responses, **{k: [c.get(k) for c in ro.columns] for k in keys})
        except RewardSourceError as e:
            raise guards.PPOStopError(f"step {step}: {e}; stopping before the update (the last checkpoint is "
                                      "intact)") from e
        return torch.tensor(scores, dtype=torch.float32, device=self.accelerator.device)

    @torch.no_grad()
    def logprobs_and_values(self, ro: Rollout):
        """Policy logprobs, values and reference logprobs, ``local_rollout_forward_batch_size`` sequences per
        forward (the logits of a large vocabulary for the whole batch would not fit; by default the update's
        micro-batch, so both passes run the same kernel shapes), under the training forward's precision."""
        unwrapped, temperature = self.accelerator.unwrap_model(self.model), self.cfg.temperature
        ref_fn = lambda *a: reference_logits(unwrapped, self.ref, *a)  # noqa: E731
        parts = []
        for index in torch.arange(len(ro.prompts)).split(self.cfg.local_rollout_forward_batch_size
                                                         or self.sizes.micro_batch_size):
            mb = ro.select(index)
            tensors = (mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask, temperature)
            with compute_precision(self.accelerator):
                logprobs, values, _ = forward_response(unwrapped, *tensors)
                ref_logprobs, _, _ = forward_response(ref_fn, *tensors, with_values=False)
            parts.append((logprobs, values, ref_logprobs))
        logprobs, values, ref_logprobs = zip(*parts)
        values = torch.cat(values) if self.cfg.needs_critic else None
        return torch.cat(logprobs), values, torch.cat(ref_logprobs)

    # ------------------------------------------------------------------ update plumbing

    def loss_normalizer(self, minibatch_mask: torch.Tensor) -> Normalizer:
        """The minibatch's real tokens and sequences over all processes, per averaged micro-batch loss (the
        backward divides by the accumulation steps, the gradient all-reduce by the process count)."""
        tokens, sequences = global_sums(self.accelerator, [minibatch_mask.sum(), minibatch_mask.shape[0]])
        shares = self.cfg.gradient_accumulation_steps * self.accelerator.num_processes
        return Normalizer(max(tokens, 1.0) / shares, sequences / shares, float(self.cfg.max_new_tokens))

    def prepare(self, model):
        """(model, optimizer, scheduler) placed for the run: DDP or DeepSpeed through accelerate's prepare, or
        FSDP2 through torch's fully_shard (docs/design.md, "Parallelism"); the optimizer over what is trained."""
        from transformers import get_scheduler

        cfg, acc = self.cfg, self.accelerator
        self.fsdp2 = fsdp2_requested()
        if cfg.critic_max_grad_norm is not None and acc.state.deepspeed_plugin is not None:
            raise ValueError("critic_max_grad_norm: DeepSpeed clips all gradients together (gradient_clipping in its "
                             "config); unset it, or train without DeepSpeed")
        if self.fsdp2:  # accelerate keeps the process group and the collectives (see distributed.py)
            if cfg.save_steps:
                raise ValueError("save_steps with FSDP2 is not supported yet (accelerate's save_state does not see a "
                                 "model sharded by torch's fully_shard); use DeepSpeed ZeRO-3 for resumable runs")
            if not hasattr(model, "fsdp_roots"):
                raise ValueError(f"FSDP2 supports topology separate and the critic-free estimators, not {cfg.topology} "
                                 "(its forward calls parts of the policy that FSDP2 would not gather); use DeepSpeed")
            blocks = {n for m in [*model.fsdp_roots(), model.generation_model()]
                      for n in getattr(m, "_no_split_modules", None) or []}
            model = shard_fsdp2(model.to(acc.device), blocks, model.fsdp_roots())
        groups = [{"params": model.policy_parameters(), "lr": cfg.learning_rate},
                  {"params": model.critic_parameters(), "lr": cfg.critic_learning_rate or cfg.learning_rate}]
        groups = [g for g in groups if g["params"]]  # no critic group for the critic-free estimators
        optimizer = torch.optim.AdamW(groups, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                      fused=acc.device.type in ("cpu", "cuda") and not self.fsdp2)
        updates = cfg.max_steps * cfg.ppo_epochs * cfg.num_minibatches
        # stepped by hand on each real optimiser step: accelerate's prepared scheduler would step once per process
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, updates)
        model, optimizer = (model, optimizer) if self.fsdp2 else acc.prepare(model, optimizer)
        return model, optimizer, scheduler

    def place_reference(self, ref):
        """The frozen reference: under DeepSpeed a DeepSpeed inference engine (after TRL), sharded like the
        policy under ZeRO-3; else a full copy on this process's device (FSDP2 included: docs/design.md,
        "Parallelism")."""
        if ref is None:
            return None
        if zero_stage(self.accelerator):  # also below ZeRO-3: the engine gives it the policy's precision
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(ref, self.accelerator)
        return ref.to(self.accelerator.device)

    def optimizer_step(self) -> dict:
        """Clip, step, schedule; the gradient norms before clipping. Under DeepSpeed the engine already
        stepped in ``backward`` (accelerate's wrapper) and its norm is that step's (none before the first)."""
        acc, cfg = self.accelerator, self.cfg
        model = acc.unwrap_model(self.model)
        if cfg.critic_max_grad_norm is None or not model.critic_parameters():
            norms = {"train/grad_norm": acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)}
        else:  # the critic's large early gradients would otherwise shrink the policy's step
            norms = {"train/grad_norm": acc.clip_grad_norm_(model.policy_parameters(), cfg.max_grad_norm),
                     "train/critic_grad_norm": acc.clip_grad_norm_(model.critic_parameters(), cfg.critic_max_grad_norm)}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        # FSDP2 reports a DTensor of the global norm
        norms = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in norms.items()}
        return {k: float(v) for k, v in norms.items() if v is not None}

    def ptx_loss(self) -> torch.Tensor:
        """InstructGPT's PPO-ptx: next-token loss on demonstration assistant tokens, through the policy."""
        from .ptx import ptx_batch

        self._ptx_calls += 1
        generator = seeded_generator(self.cfg.seed, "ptx", self.progress.step, self._ptx_calls)
        ids, mask, labels = ptx_batch(self.tokenizer, self.ptx, self.cfg.ptx_batch_size, generator,
                                      self.accelerator.device)
        logits, _ = self.model(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100)

    def reduce_metrics(self, ro: Rollout, stats: dict, timings: dict) -> dict:
        """Global means of the step's figures, plus counters (TRL's ``eps`` = episodes, ``lr``)."""
        acc, cfg, n = self.accelerator, self.cfg, self.progress.step
        local = {**stats, **timings}
        if self.gold_fn is not None:  # demo task: the true reward of this rollout, for logging only
            gold = self.gold_fn(ro.prompts, ro.responses)
            local["objective/gold_reward"] = sum(gold) / len(gold)
        metrics = global_means(acc, local)
        metrics["val/num_eos_tokens"] *= acc.num_processes  # a count: summed, not averaged
        generated = global_sum(acc, float(ro.response_mask.sum()))
        lr = self.scheduler.get_last_lr()[0]
        metrics.update({"step": n, "episode": n * cfg.batch_size, "eps": n * cfg.batch_size, "lr": lr,
                        "train/lr": lr, "objective/kl_coef": self.kl_ctl.value,
                        "throughput/tokens_per_s": generated / metrics["time/step"]})
        guards.check_metrics(n, metrics)
        return metrics

    # ------------------------------------------------------------------ the loop

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
        bar = tqdm(total=cfg.max_steps, initial=self.progress.step, disable=not acc.is_main_process, desc="PPO")
        while self.progress.step < cfg.max_steps:
            metrics = self.step()
            history.append(metrics)
            if on_step is not None:
                on_step(metrics, self.last_rollout)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            if cfg.save_steps and self.progress.step % cfg.save_steps == 0:
                save_checkpoint(acc, cfg.output_dir, self.progress.step)
        bar.close()
        return history
