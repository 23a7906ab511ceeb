"""Peak memory of PPO's rollout recompute against batch size, with a 151,936-token vocabulary.

    python benchmarks/rollout_vocab_memory.py [--batches 8,16,32,64] [--forward-batch 8]

A tiny Qwen2-style model (2 layers, hidden 64, Qwen2's vocabulary of 151,936 tokens, fp32) as policy and
reference; each configuration runs in a fresh process (this file with ``--worker``) the rollout's no-grad
recompute as ``PPOTrainer.logprobs_and_values`` does: ``local_rollout_forward_batch_size`` sequences per
``forward_response`` (chunked logprobs, detached entropy), policy then reference, 32 prompt + 64 response
tokens. Peak RSS above the RSS after building the models and the batch (``/proc/self/clear_refs``), with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors return to the system (tests/test_memory.py explains).
The last row is the contrast: one forward over the whole batch. Ratios are against the first row. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN2_TINY = dict(vocab_size=151936, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
QUERY, RESPONSE = 32, 64


def worker(batch: int, forward_batch: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(REPO))
    from rlhf.ppo.actor_critic import PolicyOnly
    from rlhf.ppo.rollout import forward_response

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN2_TINY)
    policy, reference = PolicyOnly(Qwen2ForCausalLM(cfg).eval()), Qwen2ForCausalLM(cfg).eval()
    query = torch.randint(1, cfg.vocab_size, (batch, QUERY))
    response = torch.randint(1, cfg.vocab_size, (batch, RESPONSE))
    qmask, rmask = torch.ones_like(query), torch.ones_like(response)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    def ref_fn(ids, mask, pos, keep):
        return reference(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits

    with torch.no_grad():
        parts = []
        for index in torch.arange(batch).split(forward_batch):
            tensors = (query[index], qmask[index], response[index], rmask[index], 1.0)
            logprobs, _, entropy = forward_response(policy, *tensors, with_entropy=True)
            ref_logprobs, _, _ = forward_response(ref_fn, *tensors, with_values=False)
            parts.append((logprobs, ref_logprobs, entropy))
    print(json.dumps({"peak": status("VmHWM") - base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,16,32,64")
    parser.add_argument("--forward-batch", type=int, default=8, help="local_rollout_forward_batch_size")
    parser.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    batches = [int(b) for b in args.batches.split(",")]
    configs = [(b, min(args.forward_batch, b)) for b in batches] + [(batches[-1], batches[-1])]
    head = f"{'prompts':>8}{'forward batch':>15}{'peak MiB':>10}{'vs first':>10}{'one fp32 logits MiB':>21}"
    lines = [head, "-" * len(head)]
    first = None
    for batch, fb in configs:
        out = subprocess.run([sys.executable, __file__, "--worker", str(batch), str(fb)], capture_output=True,
                             text=True, env=env, cwd=REPO)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"] / 2**20
        first = first or peak
        logits = fb * (RESPONSE + 1) * QWEN2_TINY["vocab_size"] * 4 / 2**20
        lines.append(f"{batch:>8}{fb:>15}{peak:>10.0f}{peak / first:>9.2f}x{logits:>21.0f}")
    lines.append(f"\ntiny Qwen2 (2 layers, hidden 64, vocabulary {QWEN2_TINY['vocab_size']:,}), fp32, {QUERY} prompt + "
                 f"{RESPONSE} response tokens; last row: the whole batch in one forward (the contrast)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
