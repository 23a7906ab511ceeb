"""The pipeline's summary table and markdown report with PNG plots, from the files each stage wrote.

Inputs: OUT/sft/sft_summary.json, OUT/reward/reward_summary.json, OUT/ppo/ppo_summary.json and
OUT/ppo/metrics.jsonl. Outputs: OUT/report.md and OUT/plots/*.png; the table is printed too.
"""

from __future__ import annotations

import json
import os


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(out: str, timings: dict) -> dict:
    """Every stage's summary (by the registry's file names), the timings and PPO's per-step metrics."""
    from .stages import STAGES

    data = {name: _read_json(os.path.join(out, name, stage.summary_file)) for name, stage in STAGES.items()}
    return {**data, "timings": timings, "metrics": _read_metrics(os.path.join(out, "ppo", "metrics.jsonl"))}


def summary_rows(data: dict) -> list[tuple[str, str, str]]:
    """(stage, seconds, key figures) per stage that ran: the figures its registry entry names."""
    from .stages import STAGES

    rows = []
    for name, stage in STAGES.items():
        summary = data.get(name)
        if summary:
            figures = ", ".join(f"{label} {_fmt(summary.get(key))}" for label, key in stage.figures)
            rows.append((name, f"{data['timings'].get(name, 0):.0f}", figures))
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def gold_rows(data: dict) -> list[tuple[str, float, float, float]]:
    """(policy, gold reward, EOS rate, length) for base, SFT and PPO on the same held-out prompts."""
    sft, ppo = data["sft"], data["ppo"]
    rows = []
    if "gold/base_gold_reward" in sft:
        rows.append(("base (untrained)", sft["gold/base_gold_reward"], sft["gold/base_eos_rate"],
                     sft["gold/base_response_length"]))
    start = "sft" if "sft/gold_reward" in ppo else None
    if start:
        rows.append(("SFT", ppo["sft/gold_reward"], ppo["sft/eos_rate"], ppo["sft/response_length"]))
    elif "gold/sft_gold_reward" in sft:
        rows.append(("SFT", sft["gold/sft_gold_reward"], sft["gold/sft_eos_rate"], sft["gold/sft_response_length"]))
    if "ppo/gold_reward" in ppo:
        rows.append(("PPO", ppo["ppo/gold_reward"], ppo["ppo/eos_rate"], ppo["ppo/response_length"]))
    return rows


def format_table(data: dict) -> str:
    lines = [f"{'stage':<14}{'seconds':>9}  key figures"]
    lines += [f"{s:<14}{sec:>9}  {figures}" for s, sec, figures in summary_rows(data)]
    gold = gold_rows(data)
    if gold:
        lines += ["", f"{'policy':<18}{'gold reward':>12}{'EOS rate':>10}{'length':>8}"]
        lines += [f"{name:<18}{g:>12.3f}{e:>10.2f}{n:>8.1f}" for name, g, e, n in gold]
    return "\n".join(lines)


def make_plots(data: dict, plot_dir: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    metrics, paths = data["metrics"], {}
    if metrics:
        steps = [m["step"] for m in metrics]

        def save(name, fig):
            fig.tight_layout()
            paths[name] = os.path.join(plot_dir, f"{name}.png")
            fig.savefig(paths[name], dpi=100)
            plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [m["objective/scores"] for m in metrics], label="RM score (normalized)")
        ax.plot(steps, [m["objective/rlhf_reward"] for m in metrics], label="score - beta*KL")
        if "objective/gold_reward" in metrics[0]:
            ax.plot(steps, [m["objective/gold_reward"] for m in metrics], label="gold reward")
        ax.set_xlabel("PPO step")
        ax.set_ylabel("reward")
        twin = ax.twinx()
        twin.plot(steps, [m["objective/kl"] for m in metrics], color="grey", linestyle="--", label="KL")
        twin.set_ylabel("KL to reference")
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="lower right", fontsize=8)
        ax.set_title("reward and KL over PPO steps")
        save("reward_kl", fig)

        fig, ax = plt.subplots(figsize=(5, 3.5))
        kl = [m["objective/kl"] for m in metrics]
        ax.scatter(kl, [m["objective/raw_scores"] for m in metrics], s=12, label="proxy: RM reward")
        if "objective/gold_reward" in metrics[0]:
            ax.scatter(kl, [m["objective/gold_reward"] for m in metrics], s=12, label="gold reward")
        ax.set_xlabel("KL to reference (nats per reply)")
        ax.set_ylabel("reward")
        ax.set_title("proxy vs gold reward as KL grows")
        ax.legend(fontsize=8)
        save("proxy_vs_gold", fig)

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(steps, [m["rollout/response_length"] for m in metrics])
        ax.set_xlabel("PPO step")
        ax.set_ylabel("tokens per reply")
        ax.set_title("response length")
        save("response_length", fig)
    rm = data["reward"]
    if "eval/accuracy" in rm:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar(["held-out accuracy"], [rm["eval/accuracy"]], color="tab:green")
        ax.axhline(0.5, color="grey", linestyle="--", label="chance")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("reward model")
        fig.tight_layout()
        paths["rm_accuracy"] = os.path.join(plot_dir, "rm_accuracy.png")
        fig.savefig(paths["rm_accuracy"], dpi=100)
        plt.close(fig)
    return paths


def write_report(out: str, timings: dict, group: str) -> str:
    data = collect(out, timings)
    table = format_table(data)
    print("\n" + table)
    plots = make_plots(data, os.path.join(out, "plots"))
    calibration = os.path.join(out, "reward", "calibration.png")
    if os.path.exists(calibration):
        plots["rm_calibration"] = calibration
    lines = ["# RLHF pipeline report", "", f"W&B group: `{group}`; outputs in `{out}`.", "", "```", table, "```", ""]
    titles = {"reward_kl": "Reward and KL over PPO steps",
              "proxy_vs_gold": "Proxy (RM) reward against gold reward as KL grows (over-optimisation shows as "
                               "the two parting)",
              "response_length": "Response length", "rm_accuracy": "Reward-model held-out accuracy",
              "rm_calibration": "Reward-model calibration"}
    for name, path in plots.items():
        lines += [f"## {titles[name]}", "", f"![{name}]({os.path.relpath(path, out)})", ""]
    report = os.path.join(out, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({k: v for k, v in data.items() if k != "metrics"}, f, indent=2)
    return report
