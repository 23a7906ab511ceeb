"""PPO step time with bf16 autocast (``bf16: true``: fp32 master weights, bf16 compute) against fp32, on this CPU.

    python benchmarks/precision.py [--steps 4] [--warmup 1] [--repeats 1] [--layers 8] [--hidden 512]

A Llama big enough that matrix products dominate (default 8 layers x hidden 512, the demo tokenizer's
vocabulary), random weights, as policy, reference, critic and reward model (separate topology); demo-task
prompts, batch 16, 32 new tokens, 2 PPO epochs. Each precision runs in its own fresh subprocess (this file
with ``--worker``), alternately when ``--repeats`` > 1; the table keeps each one's fastest run (lowest median
s/step) and the speed-up is fp32 s/step over bf16 s/step, both measured in the same invocation. A CPU with
AVX512-BF16 / AMX runs bf16 matrix products several times faster than fp32; one without runs them slower.
Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.ppo_throughput import peak_rss_mb, run_worker  # noqa: E402


def build_models(out: Path, layers: int, hidden: int) -> dict:
    """A random Llama of the requested size with the demo tokenizer, and a reward model of the same shape."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    from rlhf.data.demo_task import DemoTaskConfig, sft_examples
    from rlhf.models import resolve_model_path

    hf_logging.set_verbosity_error()
    demo = resolve_model_path("tiny:demo")
    config = AutoConfig.from_pretrained(demo)
    config.update({"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": int(hidden * 8 / 3) // 64 * 64,
                   "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "head_dim": 64})
    torch.manual_seed(0)
    policy = out / "policy"
    AutoModelForCausalLM.from_config(config).save_pretrained(policy)
    AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1).save_pretrained(out / "rm")
    tokenizer = AutoTokenizer.from_pretrained(demo)
    for path in (policy, out / "rm"):
        tokenizer.save_pretrained(path)
    prompts = [e["messages"][:-1] for e in sft_examples(DemoTaskConfig(seed=0), n=256)]
    return {"policy": str(policy), "reward_model": str(out / "rm"), "prompts": prompts, "output_dir": str(out / "run")}


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from rlhf.config import PPOConfig
    from rlhf.models import load_tokenizer
    from rlhf.ppo.trainer import PPOTrainer

    cfg = PPOConfig(model_name_or_path=spec["policy"], reward_model=spec["reward_model"], topology="separate",
                    bf16=spec["bf16"], batch_size=16, max_new_tokens=32, ppo_epochs=2, learning_rate=1e-5,
                    max_steps=spec["warmup"] + spec["steps"], seed=0, output_dir=spec["output_dir"],
                    report_to="none", num_sample_generations=0, eval_prompts=8,
                    ratio_check_tolerance=spec["ratio_tolerance"])
    trainer = PPOTrainer(cfg, [{"prompt": p} for p in spec["prompts"]], load_tokenizer(spec["policy"]))
    stamps, phases = [time.perf_counter()], []

    def on_step(metrics, rollout):
        stamps.append(time.perf_counter())
        phases.append({k: v for k, v in metrics.items() if k.startswith("time/")})

    trainer.train(on_step)
    steps = [b - a for a, b in zip(stamps, stamps[1:])][spec["warmup"]:]
    kept = phases[spec["warmup"]:]
    print(json.dumps({"median_s_per_step": statistics.median(steps), "peak_rss_mb": peak_rss_mb(),
                      "phases_mean_s": {k: statistics.fmean(p[k] for p in kept) for k in kept[0]},
                      "torch_threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    runs = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory(prefix="precision_bench_") as tmp:
        base = build_models(Path(tmp), args.layers, args.hidden)
        for _ in range(args.repeats):
            for name in runs:
                # bf16's first-minibatch ratio deviates by rounding (the recompute and update forwards see
                # different shapes); the check is the trainer's, its tolerance here only keeps the run going
                spec = {**base, "bf16": name == "bf16", "steps": args.steps, "warmup": args.warmup,
                        "ratio_tolerance": 1e-3 if name == "fp32" else 5e-2}
                path = Path(tmp) / f"{name}.json"
                path.write_text(json.dumps(spec))
                runs[name].append(run_worker([sys.executable, __file__, "--worker", str(path)], name, args.threads))
    best = {k: min(v, key=lambda r: r["median_s_per_step"]) for k, v in runs.items()}
    head = f"{'precision':<22}{'s/step':>10}{'rollout s':>11}{'train s':>10}{'peak RSS MB':>13}{'speed-up':>10}"
    lines = [head, "-" * len(head)]
    for name, label in (("fp32", "fp32"), ("bf16", "bf16 autocast")):
        r = best[name]
        ph = r["phases_mean_s"]
        rollout = sum(ph.get(f"time/{k}", 0.0) for k in ("generate", "reference", "reward"))
        lines.append(f"{label:<22}{r['median_s_per_step']:>10.3f}{rollout:>11.3f}{ph.get('time/train', 0.0):>10.3f}"
                     f"{r['peak_rss_mb']:>13.0f}{best['fp32']['median_s_per_step'] / r['median_s_per_step']:>9.2f}x")
    lines.append(f"\nLlama {args.layers} layers x hidden {args.hidden}, separate topology, batch 16, 32 new tokens, "
                 f"2 epochs; median of {args.steps} steps after {args.warmup} warm-up, best of {args.repeats}; "
                 f"torch threads {best['fp32']['torch_threads']}; rollout = generate + reference + reward")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
