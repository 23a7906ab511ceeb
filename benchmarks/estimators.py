"""The critic-free estimators measured: peak memory against PPO with a critic, a GRPO step against TRL 1.16's
``GRPOTrainer``, and PPO vs GRPO vs RLOO on the demo task.

    python benchmarks/estimators.py memory [--steps 2]             # critic-free vs separate critic: peak RSS
    python benchmarks/estimators.py trl [--steps 4 --warmup 1]     # our GRPO step vs trl.GRPOTrainer
    python benchmarks/estimators.py demo [--sft DIR --reward DIR]  # configs/demo/{ppo,grpo,rloo}.yaml
    python benchmarks/estimators.py memory trl demo                # all three

``memory`` and ``trl`` use a scratch Llama of 8 layers x 512 hidden (26.5M parameters, built offline like
``tiny:demo``, with the demo tokenizer), large enough that weights, gradients and AdamW state dominate the
process, and a reward model that is ``AutoModelForSequenceClassification`` of it (saved once, loaded by every
worker). Each configuration runs in its own fresh subprocess, so its peak RSS (``ru_maxrss``) is its own.

memory: the same trainer, policy, reward model, prompts, batch (8 prompts x 4 replies), 24 new tokens, 2 epochs
x 1 minibatch; only ``advantage_estimator`` differs (gae builds a separate critic from the RM and trains it;
grpo/rloo build none). Reported: RSS after imports (before any model), peak RSS, and the peak above the
after-import RSS (the part the models, optimiser state and activations take: what the estimator changes).

trl: our GRPO against ``trl.GRPOTrainer`` with the knobs matched (printed with the table). A step is one
rollout: generate, score, then ``num_iterations`` (= our ``ppo_epochs``) optimiser steps over the group batch.

demo: from one demo SFT and RM (trained here with configs/demo/sft.yaml and reward.yaml unless given), runs
``python -m rlhf ppo`` with each of configs/demo/ppo.yaml, grpo.yaml, rloo.yaml and tabulates the held-out
evaluation of ppo_summary.json with the wall time and peak RSS of each run.

Not a test: timings depend on the machine, so nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8)
SETTINGS = {  # both parts; each worker reads them from the spec
    "prompts_per_step": 8,
    "samples_per_prompt": 4,
    "max_new_tokens": 24,
    "epochs": 2,             # ours: ppo_epochs (1 minibatch each); TRL: num_iterations
    "learning_rate": 1e-5,
    "adam_eps": 1e-8,        # TRL's (transformers') default
    "beta": 0.04,            # KL in the loss (k3), as TRL's GRPO puts it
    "temperature": 1.0,
    "max_grad_norm": 1.0,
    "seed": 0,
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child_env(threads: int | None = None) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_worker(args: list[str], label: str, threads: int | None) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], cwd=REPO, env=child_env(threads),
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-6000:])
        raise SystemExit(f"{label} failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_spec(out: Path, steps: int, warmup: int) -> Path:
    """Build the 8x512 policy and its reward model once; tokenise nothing (both systems template the prompts)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from rlhf.data.demo_task import DemoTaskConfig, sft_examples
    from rlhf.tiny_model import TinyModelSpec, tiny_demo_path

    hf_logging.set_verbosity_error()  # the new score head's "MISSING" load report is expected
    hf_logging.disable_progress_bar()
    policy = tiny_demo_path(TinyModelSpec(**MODEL))
    rm_dir = out / "reward_model"
    AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1).save_pretrained(rm_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(policy).save_pretrained(rm_dir)
    prompts = [e["messages"][:-1] for e in sft_examples(DemoTaskConfig(seed=0), n=512)]
    spec = {**SETTINGS, "policy": policy, "reward_model": str(rm_dir), "prompts": prompts, "steps": steps,
            "warmup": warmup, "output_dir": str(out / "run")}
    path = out / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def our_config(spec: dict, estimator: str, reward: dict, **overrides):
    from rlhf.config import PPOConfig

    critic_free = estimator != "gae"
    fields = dict(
        model_name_or_path=spec["policy"], **reward, topology="separate", dtype="float32",
        advantage_estimator=estimator, samples_per_prompt=spec["samples_per_prompt"],
        batch_size=spec["prompts_per_step"], max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
        ppo_epochs=spec["epochs"], num_minibatches=1, gradient_accumulation_steps=1,
        kl_penalty="loss" if critic_free else "reward", kl_estimator="k3" if critic_free else "k1",
        kl_coef=spec["beta"], learning_rate=spec["learning_rate"], adam_eps=spec["adam_eps"],
        max_grad_norm=spec["max_grad_norm"], lr_scheduler_type="constant",
        max_steps=spec["warmup"] + spec["steps"], seed=spec["seed"], output_dir=spec["output_dir"],
        report_to="none", num_sample_generations=0, save_steps=0)
    return PPOConfig(**{**fields, **overrides})


def train_ours(cfg, prompts) -> tuple[dict, list[float], list[dict]]:
    """Build our trainer and run it; (RSS marks, loop-end timestamps, per-step time/* metrics)."""
    from rlhf.models import load_tokenizer
    from rlhf.ppo.trainer import PPOTrainer

    marks = {"rss_after_imports_mb": peak_rss_mb()}
    trainer = PPOTrainer(cfg, [{"prompt": p} for p in prompts], load_tokenizer(cfg.model_name_or_path))
    marks["rss_after_build_mb"] = peak_rss_mb()
    stamps, phases = [time.perf_counter()], []

    def on_step(metrics, rollout):
        stamps.append(time.perf_counter())
        phases.append({k: v for k, v in metrics.items() if k.startswith("time/")})

    trainer.train(on_step)
    marks["peak_rss_mb"] = peak_rss_mb()
    marks["has_critic"] = cfg.needs_critic
    return marks, stamps, phases


# ---------------------------------------------------------------- part a: memory

def memory_worker(spec_path: str, estimator: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch  # noqa: F401  (imports first: the after-import RSS is the baseline the ratio subtracts)
    import transformers  # noqa: F401

    import rlhf.ppo.trainer  # noqa: F401

    cfg = our_config(spec, estimator, {"reward_model": spec["reward_model"]},
                     max_steps=spec["steps"], kl_penalty="reward", kl_estimator="k1")
    marks, _, _ = train_ours(cfg, spec["prompts"])
    print(json.dumps({"estimator": estimator, **marks}))


def memory_part(spec: str, estimators: list[str], threads: int | None) -> str:
    rows = [run_worker(["--memory-worker", spec, e], f"memory worker {e}", threads) for e in estimators]
    base = next(r for r in rows if r["estimator"] == "gae")
    head = (f"{'estimator':<14}{'critic':>8}{'RSS after imports':>19}{'peak RSS MB':>13}{'above imports':>15}"
            f"{'peak / gae':>12}{'above / gae':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        above, base_above = r["peak_rss_mb"] - r["rss_after_imports_mb"], base["peak_rss_mb"] - base[
            "rss_after_imports_mb"]
        lines.append(f"{r['estimator']:<14}{'yes' if r['has_critic'] else 'no':>8}{r['rss_after_imports_mb']:>19.0f}"
                     f"{r['peak_rss_mb']:>13.0f}{above:>15.0f}{r['peak_rss_mb'] / base['peak_rss_mb']:>12.2f}"
                     f"{above / base_above:>13.2f}")
    lines += ["", f"same settings for all: 8x512 Llama policy (26.5M params) + reference + RM of the same size, fp32 CPU; "
              f"{SETTINGS['prompts_per_step']} prompts x {SETTINGS['samples_per_prompt']} replies, "
              f"{SETTINGS['max_new_tokens']} new tokens, {SETTINGS['epochs']} epochs x 1 minibatch, KL in the "
              "reward (k1) for all; gae adds the separate critic (from the RM) and its AdamW state.",
              "peak RSS = ru_maxrss of the fresh process (Python, torch, transformers and all). 'above imports' "
              "subtracts the RSS after importing torch/transformers/rlhf, before any model: the part the models, "
              "gradients, optimiser state and activations take. Goal: critic-free <= 0.75x gae."]
    return "\n".join(lines)


# ---------------------------------------------------------------- part b: GRPO step, ours vs TRL 1.16

def step_times(stamps: list[float], every: int, warmup: int) -> list[float]:
    """Durations of whole rollouts from optimiser-step-end timestamps (``every`` optimiser steps a rollout)."""
    ends = stamps[::every]
    return [b - a for a, b in zip(ends, ends[1:])][warmup:]


def ours_grpo_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    cfg = our_config(spec, "grpo", {"reward_function": "gold"}, loss_agg_mode="token-mean", missing_stop_penalty=0.0,
                     reward_normalization=False)
    marks, stamps, phases = train_ours(cfg, spec["prompts"])
    kept = phases[spec["warmup"]:]
    print(json.dumps({"system": "ours (rlhf.ppo grpo)", "step_s": step_times(stamps, 1, spec["warmup"]),
                      "phases_mean_s": {k: statistics.fmean(p[k] for p in kept) for k in kept[0]},
                      "torch_threads": torch.get_num_threads(), **marks}))


def trl_gold_reward(prompts, completions, **_):
    """The demo's gold reward in TRL's reward-function signature (conversational completions)."""
    from rlhf.data.demo_task import gold_rewards

    return gold_rewards(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions])


def trl_grpo_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    marks = {"rss_after_imports_mb": peak_rss_mb()}
    group = spec["prompts_per_step"] * spec["samples_per_prompt"]
    args = GRPOConfig(
        output_dir=spec["output_dir"], use_cpu=True, bf16=False, seed=spec["seed"],
        per_device_train_batch_size=group, gradient_accumulation_steps=1,  # one optimiser step over the whole group
        num_generations=spec["samples_per_prompt"], max_completion_length=spec["max_new_tokens"],
        num_iterations=spec["epochs"], beta=spec["beta"], loss_type="dapo", scale_rewards="group",
        temperature=spec["temperature"], top_p=1.0, top_k=0, learning_rate=spec["learning_rate"],
        adam_epsilon=spec["adam_eps"], max_grad_norm=spec["max_grad_norm"], lr_scheduler_type="constant",
        max_steps=(spec["warmup"] + spec["steps"]) * spec["epochs"], report_to="none", logging_steps=10**6,
        save_strategy="no", disable_dropout=True, log_completions=False, dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
    stamps = [0.0]

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer = GRPOTrainer(model=spec["policy"], reward_funcs=trl_gold_reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in spec["prompts"]]),
                          processing_class=tokenizer, callbacks=[Stamp()])
    phase_s = {"generate_and_score": [], "training_step": []}  # TRL's own methods, timed from outside

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            phase_s[name].append(time.perf_counter() - start)
            return out
        return wrapper

    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
    trainer.training_step = timed("training_step", trainer.training_step)
    marks["rss_after_build_mb"] = peak_rss_mb()
    trainer.train()
    marks["peak_rss_mb"] = peak_rss_mb()
    warm, epochs = spec["warmup"], spec["epochs"]
    generate = phase_s["generate_and_score"][warm:]
    # the first training_step of a rollout generates (via _prepare_inputs): its time includes generate's
    train = (sum(phase_s["training_step"][warm * epochs:]) - sum(generate)) / len(generate)
    print(json.dumps({"system": f"trl=={trl.__version__} GRPOTrainer", "step_s": step_times(stamps, epochs, warm),
                      "phases_mean_s": {"generate (+ old and ref logprobs, reward)": statistics.fmean(generate),
                                        f"train ({epochs} x fwd+bwd)": train},
                      "torch_threads": torch.get_num_threads(), **marks}))


def trl_part(spec: str, repeats: int, threads: int | None, steps: int, warmup: int) -> str:
    ours_runs, trl_runs = [], []
    load_before = os.getloadavg()[0]
    for _ in range(repeats):  # alternate, so background load affects both alike
        ours_runs.append(run_worker(["--ours-grpo-worker", spec], "our GRPO worker", threads))
        trl_runs.append(run_worker(["--trl-grpo-worker", spec], "TRL GRPO worker", threads))
    load_after = os.getloadavg()[0]
    ours, base = (min(runs, key=lambda r: statistics.median(r["step_s"])) for runs in (ours_runs, trl_runs))
    head = f"{'system':<30}{'s/step':>9}{'peak RSS MB':>13}{'RSS after load':>16}"
    lines = [head, "-" * len(head)]
    for r in (ours, base):
        lines.append(f"{r['system']:<30}{statistics.median(r['step_s']):>9.3f}{r['peak_rss_mb']:>13.0f}"
                     f"{r['rss_after_build_mb']:>16.0f}")
    speedup = statistics.median(base["step_s"]) / statistics.median(ours["step_s"])
    fmt = lambda p: ", ".join(f"{k.removeprefix('time/')} {v:.3f}s" for k, v in p.items())  # noqa: E731
    lines += ["", f"speed-up (TRL s/step / ours): {speedup:.2f}x   (goal >= 1.5x); "
              f"peak memory ours / TRL: {ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}",
              f"our phases (mean per step): {fmt(ours['phases_mean_s'])}",
              f"TRL phases (mean per step): {fmt(base['phases_mean_s'])}",
              "per-run median s/step: ours " + ", ".join(f"{statistics.median(r['step_s']):.3f}" for r in ours_runs)
              + "; TRL " + ", ".join(f"{statistics.median(r['step_s']):.3f}" for r in trl_runs),
              f"a step = one rollout: {SETTINGS['prompts_per_step']} prompts x {SETTINGS['samples_per_prompt']} "
              f"replies (TRL num_generations, per_device_train_batch_size {SETTINGS['prompts_per_step'] * SETTINGS['samples_per_prompt']}"
              ", gradient_accumulation_steps 1 = our batch_size, samples_per_prompt, 1 minibatch), "
              f"{SETTINGS['max_new_tokens']} new tokens (max_completion_length), {SETTINGS['epochs']} optimiser steps "
              "(num_iterations = ppo_epochs), beta 0.04 k3 KL in the loss, token-mean over the batch (loss_type "
              "dapo), advantages (r - group mean) / group std (scale_rewards group), clip 0.2, lr 1e-5 constant, "
              "AdamW eps 1e-8, grad-norm clip 1, temperature 1, no top-p/top-k, reward: the demo's gold function "
              "(ours also without the missing-stop penalty and RM normalization), 8x512 Llama, fp32 CPU, no vLLM.",
              f"median over {steps} steps after {warmup} warm-up, best of {repeats} run(s); torch threads "
              f"{ours['torch_threads']}, {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before / "
              f"{load_after:.1f} after"]
    return "\n".join(lines)


# ---------------------------------------------------------------- part c: the demo table

def rlhf_cli(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``python -m rlhf ARGS`` to completion; (wall seconds, peak RSS MB of the process tree's largest)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf", *args], cwd=REPO, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"rlhf {args[0]} failed (exit {proc.returncode}); log: {log}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def demo_part(out: Path, sft: str | None, reward: str | None) -> str:
    notes = []
    if not (sft and reward):
        sft, reward = str(out / "sft"), str(out / "reward")
        wall, _ = rlhf_cli(["sft", "--config", "configs/demo/sft.yaml", f"output_dir={sft}", "report_to=none"],
                           out / "sft.log")
        wall_rm, _ = rlhf_cli(["reward", "--config", "configs/demo/reward.yaml", f"model_name_or_path={sft}",
                               f"output_dir={reward}", "report_to=none"], out / "reward.log")
        notes.append(f"SFT and RM trained here from configs/demo/sft.yaml, reward.yaml ({wall:.0f} s + {wall_rm:.0f} s)")
    rows = []
    for name in ("ppo", "grpo", "rloo"):
        run_dir = out / name
        wall, rss = rlhf_cli(["ppo", "--config", f"configs/demo/{name}.yaml", f"model_name_or_path={sft}",
                              f"reward_model={reward}", f"output_dir={run_dir}", "report_to=none"], out / f"{name}.log")
        summary = json.loads((run_dir / "ppo_summary.json").read_text())
        rows.append({"name": name, "wall_s": wall, "peak_rss_mb": rss, **summary})
    head = (f"{'run':<8}{'gold (held out)':>16}{'RM reward':>11}{'KL':>7}{'length':>8}{'EOS rate':>10}"
            f"{'wall s':>8}{'peak RSS MB':>13}")
    first = rows[0]
    lines = [head, "-" * len(head),
             f"{'SFT':<8}{first['sft/gold_reward']:>16.3f}{first['sft/reward']:>11.3f}{first['sft/kl']:>7.2f}"
             f"{first['sft/response_length']:>8.1f}{first['sft/eos_rate']:>10.2f}{'':>8}{'':>13}"]
    for r in rows:
        lines.append(f"{r['name'].upper():<8}{r['ppo/gold_reward']:>16.3f}{r['ppo/reward']:>11.3f}{r['ppo/kl']:>7.2f}"
                     f"{r['ppo/response_length']:>8.1f}{r['ppo/eos_rate']:>10.2f}{r['wall_s']:>8.0f}"
                     f"{r['peak_rss_mb']:>13.0f}")
    base = rows[0]
    for r in rows[1:]:
        notes.append(f"{r['name'].upper()} / PPO: wall {r['wall_s'] / base['wall_s']:.2f}x, "
                     f"peak RSS {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x")
    notes += [f"from SFT {sft} and RM {reward}; 24 steps each, 64 replies per step (PPO 64 prompts x 1, GRPO/RLOO "
              "16 x 4); held-out evaluation from ppo_summary.json (64 prompts sampled at eval_temperature 1, the same for all)",
              "wall = the whole `python -m rlhf ppo` process (imports, loading, evaluation before and after, saving); "
              "peak RSS = its ru_maxrss"]
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", help="memory, trl, demo (default: all three)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (trl); steps per run (memory)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not timed (trl)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate fresh runs per system (trl); best kept")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in every worker (default: torch's)")
    parser.add_argument("--estimators", nargs="+", default=["gae", "grpo", "rloo"], help="memory: what to compare")
    parser.add_argument("--sft", help="demo: an SFT output directory (else trained here)")
    parser.add_argument("--reward", help="demo: a reward-model output directory (else trained here)")
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--ours-grpo-worker", help=argparse.SUPPRESS)
    parser.add_argument("--trl-grpo-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(*args.memory_worker)
    if args.ours_grpo_worker:
        return ours_grpo_worker(args.ours_grpo_worker)
    if args.trl_grpo_worker:
        return trl_grpo_worker(args.trl_grpo_worker)
    parts = args.parts or ["memory", "trl", "demo"]
    if set(parts) - {"memory", "trl", "demo"}:
        parser.error(f"unknown part(s) {sorted(set(parts) - {'memory', 'trl', 'demo'})}: choose from memory, trl, demo")
    with tempfile.TemporaryDirectory(prefix="estimators_bench_") as tmp:
        if "memory" in parts or "trl" in parts:
            spec = str(build_spec(Path(tmp), args.steps, args.warmup))
        if "memory" in parts:
            print("## peak memory: critic-free vs PPO with a separate critic\n")
            print(memory_part(spec, args.estimators, args.threads), "\n", flush=True)
        if "trl" in parts:
            print("## a GRPO step: ours vs TRL's GRPOTrainer\n")
            print(trl_part(spec, args.repeats, args.threads, args.steps, args.warmup), "\n", flush=True)
        if "demo" in parts:
            print("## the demo task: PPO vs GRPO vs RLOO\n")
            print(demo_part(Path(tmp), args.sft, args.reward), flush=True)


if __name__ == "__main__":
    main()
