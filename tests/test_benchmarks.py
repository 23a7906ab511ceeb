"""The benchmark scripts still drive the trainer they measure (their figures are in benchmarks/README.md; nothing
here times anything)."""

from conftest import REPO, run_cli


def test_ppo_throughput_runs_our_trainer():
    # PPOTrainer takes prompt records ({"prompt": messages, ...}); the benchmark once passed bare message lists
    result = run_cli([str(REPO / "benchmarks" / "ppo_throughput.py"), "--ours-only", "--steps", "1", "--warmup", "0"],
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("ours (rlhf.ppo)"))
    assert float(row.split()[2]) > 0  # s/step of the one timed step
