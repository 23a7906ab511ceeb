"""PPO step throughput and peak memory: our PPOTrainer against ``trl==1.12.0``'s PPOTrainer, same settings.

    python benchmarks/ppo_throughput.py [--steps 8] [--warmup 2] [--repeats 1] [--baseline-python PATH]
    python benchmarks/ppo_throughput.py --ours-only        # skip the baseline (profiling our side)

The fixed setting (both systems): the tiny demo Llama (``tiny:demo``, 2 layers) as policy and frozen
reference, a reward model and a separate value model that are ``AutoModelForSequenceClassification`` of
the same tiny model (num_labels=1, saved once to a temp dir and loaded by both), prompts of the demo task
(chat-templated with the generation prompt, tokenised once here and passed to TRL as ids), batch 16,
24 new tokens at temperature 1, stop token EOS with a missing-EOS penalty of 1, 4 PPO epochs of one
minibatch (16 sequences, one optimiser step each), lr 3e-4 (policy and critic), AdamW eps 1e-5, fp32,
CPU, no evaluation or sample generation during training.

Each system runs in its own fresh subprocess (ours: this file with ``--worker``; TRL: the
``trl112_ppo_baseline.py`` script in the ``.venv-trl112`` virtual environment), so the peak RSS
(``ru_maxrss``, whole process: imports, four models, optimiser state, activations) is that system's alone.
A step is the wall time between the ends of consecutive training-loop iterations (a callback in both
systems), so it covers everything the loop does; the first ``--warmup`` steps are dropped and the median
of the rest is reported. Generated tokens count response tokens up to and including the stop token
(gen tokens/s = mean response tokens per step / median step time).

Not a test: timings depend on the machine, so nothing here is asserted. Create the baseline venv with

    python3 -m venv .venv-trl112
    .venv-trl112/bin/pip install torch==2.13.0      # first: the CPU wheel, not CUDA wheels
    .venv-trl112/bin/pip install trl==1.12.0
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
BASELINE_SCRIPT = REPO / "benchmarks" / "trl112_ppo_baseline.py"
DEFAULT_BASELINE_PYTHON = REPO / ".venv-trl112" / "bin" / "python"

SETTINGS = {
    "batch_size": 16,
    "max_new_tokens": 24,
    "ppo_epochs": 4,
    "num_minibatches": 1,
    "learning_rate": 3e-4,
    "adam_eps": 1e-5,
    "temperature": 1.0,
    "missing_eos_penalty": 1.0,
    "kl_coef": 0.05,
    "vf_coef": 0.1,
    "clip_range": 0.2,
    "clip_range_value": 0.2,
    "gamma": 1.0,
    "lam": 0.95,
    "max_prompt_length": 256,
    "seed": 0,
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def summarise(stamps: list[float], cpu: list[float], tokens: list[float], warmup: int) -> dict:
    """Per-step durations from loop-end timestamps (``stamps[0]`` = just before the loop), minus warm-up.

    ``cpu`` holds ``time.process_time()`` at the same points: CPU seconds of the process (all threads), which
    other processes on a busy machine inflate much less than wall time.
    """
    durations = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    cpu_s = [b - a for a, b in zip(cpu, cpu[1:])][warmup:]
    tokens = tokens[warmup:]
    return {
        "step_s": durations,
        "cpu_s": cpu_s,
        "median_cpu_s_per_step": statistics.median(cpu_s),
        "median_s_per_step": statistics.median(durations),
        "mean_s_per_step": statistics.fmean(durations),
        "steps_per_s": 1 / statistics.median(durations),
        "gen_tokens_per_s": statistics.fmean(tokens) / statistics.median(durations),  # per median step
        "mean_response_tokens": sum(tokens) / len(tokens) / SETTINGS["batch_size"],
    }


# ---------------------------------------------------------------- setup (parent process)

def build_spec(out: Path, steps: int, warmup: int) -> Path:
    """Save the reward/value model once, tokenise the prompts once; write everything both workers read."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from rlhf.data.demo_task import DemoTaskConfig, sft_examples
    from rlhf.models import resolve_model_path

    hf_logging.set_verbosity_error()  # the new score head's "MISSING" load report is expected
    hf_logging.disable_progress_bar()
    policy = resolve_model_path("tiny:demo")
    rm_dir = out / "reward_model"
    AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1).save_pretrained(rm_dir)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.save_pretrained(rm_dir)
    prompts = [e["messages"][:-1] for e in sft_examples(DemoTaskConfig(seed=0), n=512)]
    prompt_ids = [tokenizer(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)["input_ids"][-SETTINGS["max_prompt_length"]:] for p in prompts]
    spec = {**SETTINGS, "policy": policy, "reward_model": str(rm_dir), "value_model": str(rm_dir),
            "prompts": prompts, "prompt_ids": prompt_ids, "steps": steps, "warmup": warmup,
            "output_dir": str(out / "run")}
    path = out / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def run_worker(cmd: list[str], label: str, threads: int | None) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    if threads:  # the same intra-op thread count for both systems (torch reads it at start)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-6000:])
        raise SystemExit(f"{label} failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- our worker (fresh process)

def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from rlhf.config import PPOConfig
    from rlhf.models import load_tokenizer
    from rlhf.ppo.trainer import PPOTrainer

    cfg = PPOConfig(
        model_name_or_path=spec["policy"], reward_model=spec["reward_model"], critic_model=spec["value_model"],
        topology="separate", dtype="float32", batch_size=spec["batch_size"], max_new_tokens=spec["max_new_tokens"],
        max_prompt_length=spec["max_prompt_length"], temperature=spec["temperature"],
        missing_stop_penalty=spec["missing_eos_penalty"], ppo_epochs=spec["ppo_epochs"],
        num_minibatches=spec["num_minibatches"], gradient_accumulation_steps=1, clip_range=spec["clip_range"],
        clip_range_value=spec["clip_range_value"], vf_coef=spec["vf_coef"], gamma=spec["gamma"], lam=spec["lam"],
        kl_coef=spec["kl_coef"], learning_rate=spec["learning_rate"], critic_learning_rate=None,
        adam_eps=spec["adam_eps"], lr_scheduler_type="linear", total_steps=spec["warmup"] + spec["steps"],
        seed=spec["seed"], output_dir=spec["output_dir"], report_to="none", sample_every=0, eval_prompts=8,
        save_every=0,
    )
    tokenizer = load_tokenizer(spec["policy"])
    trainer = PPOTrainer(cfg, [{"prompt": p} for p in spec["prompts"]], tokenizer)  # prompt records
    rss_loaded = peak_rss_mb()
    stamps, cpu, tokens, phases = [], [], [], []

    def on_step(metrics, rollout):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        tokens.append(float(rollout.response_mask.sum()))
        phases.append({k: v for k, v in metrics.items() if k.startswith("time/")})

    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    trainer.train(on_step)
    out = summarise(stamps, cpu, tokens, spec["warmup"])
    kept = phases[spec["warmup"]:]
    out["phases_mean_s"] = {k: statistics.fmean(p[k] for p in kept) for k in kept[0]}
    out.update(system="ours", peak_rss_mb=peak_rss_mb(), rss_after_load_mb=rss_loaded,
               torch_threads=torch.get_num_threads(), versions={"torch": torch.__version__})
    print(json.dumps(out))


# ---------------------------------------------------------------- report

def table(rows: list[dict], notes: list[str]) -> str:
    head = f"{'system':<24}{'s/step':>10}{'steps/s':>10}{'gen tok/s':>12}{'peak RSS MB':>14}{'CPU s/step':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<24}{r['median_s_per_step']:>10.3f}{r['steps_per_s']:>10.2f}"
                     f"{r['gen_tokens_per_s']:>12.0f}{r['peak_rss_mb']:>14.0f}{r['median_cpu_s_per_step']:>12.3f}")
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed PPO steps per system (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="PPO steps run first and not timed")
    parser.add_argument("--repeats", type=int, default=1, help="alternate fresh runs of each system; best median kept")
    parser.add_argument("--baseline-python", default=str(DEFAULT_BASELINE_PYTHON),
                        help="python of the venv with trl==1.12.0")
    parser.add_argument("--ours-only", action="store_true", help="run only our trainer (no baseline)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in both systems (default: torch's choice)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    if not args.ours_only and not Path(args.baseline_python).exists():
        print(f"baseline interpreter {args.baseline_python} not found. Create the trl==1.12.0 venv (it is not a "
              "dependency of this project):\n\n"
              "    python3 -m venv .venv-trl112\n"
              "    .venv-trl112/bin/pip install torch==2.13.0   # the CPU wheel first\n"
              "    .venv-trl112/bin/pip install trl==1.12.0\n\n"
              "or pass --baseline-python, or --ours-only.", file=sys.stderr)
        raise SystemExit(2)

    with tempfile.TemporaryDirectory(prefix="ppo_bench_") as tmp:
        spec = str(build_spec(Path(tmp), args.steps, args.warmup))
        ours_runs, trl_runs = [], []
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):  # alternate, so background load affects both systems alike
            ours_runs.append(run_worker([sys.executable, __file__, "--worker", spec], "our PPO worker", args.threads))
            if not args.ours_only:
                trl_runs.append(run_worker([args.baseline_python, str(BASELINE_SCRIPT), spec], "TRL 1.12 baseline",
                                           args.threads))
        load_after = os.getloadavg()[0]

    def best(runs):  # the fastest run's timings; the largest peak RSS of all runs
        top = dict(min(runs, key=lambda r: r["median_s_per_step"]))
        top["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        return top

    ours = best(ours_runs)
    ours["label"] = "ours (rlhf.ppo)"
    rows, notes = [ours], []
    phases = ", ".join(f"{k.removeprefix('time/')} {v:.3f}s" for k, v in ours["phases_mean_s"].items())
    notes.append(f"our phases (mean per step): {phases}")
    if trl_runs:
        base = best(trl_runs)
        base["label"] = f"trl=={base['versions']['trl']} PPOTrainer"
        rows.append(base)
        speedup = base["median_s_per_step"] / ours["median_s_per_step"]
        memory = ours["peak_rss_mb"] / base["peak_rss_mb"]
        cpu_ratio = base["median_cpu_s_per_step"] / ours["median_cpu_s_per_step"]
        notes += [f"speed-up (TRL s/step / ours): {speedup:.2f}x   (goal >= 2x); in CPU seconds per step: {cpu_ratio:.2f}x",
                  f"peak memory (ours / TRL): {memory:.2f}   (goal <= 1)",
                  f"RSS after loading models, before training: ours {ours['rss_after_load_mb']:.0f} MB, "
                  f"TRL {base['rss_after_load_mb']:.0f} MB",
                  f"mean response tokens: ours {ours['mean_response_tokens']:.1f}, "
                  f"TRL {base['mean_response_tokens']:.1f}"]
        notes.append("per-run median s/step: ours " + ", ".join(f"{r['median_s_per_step']:.3f}" for r in ours_runs)
                     + "; TRL " + ", ".join(f"{r['median_s_per_step']:.3f}" for r in trl_runs))
        if base.get("note"):
            notes.append(base["note"])
    notes.append(f"median over {args.steps} steps after {args.warmup} warm-up, best of {args.repeats} run(s); "
                 f"batch {SETTINGS['batch_size']}, {SETTINGS['max_new_tokens']} new tokens, "
                 f"{SETTINGS['ppo_epochs']} epochs x {SETTINGS['num_minibatches']} minibatch, separate value model, "
                 f"fp32 CPU, torch threads {ours['torch_threads']}, {os.cpu_count()} CPUs, "
                 f"1-min load average {load_before:.1f} before / {load_after:.1f} after")
    print(table(rows, notes))
    if args.json:
        Path(args.json).write_text(json.dumps({"ours": ours_runs, "trl": trl_runs}, indent=2))


if __name__ == "__main__":
    main()
