"""The pipeline's summary table and markdown report with PNG plots, from the files each stage wrote.

Inputs: OUT/sft/sft_summary.json, OUT/reward/reward_summary.json, OUT/ppo/ppo_summary.json,
OUT/ppo/metrics.jsonl, the Trainer's OUT/{sft,reward}/trainer_state.json (loss curves) and the pipeline's own
evaluation, OUT/evaluation/evaluation.json (``rlhf.pipeline_eval``): the policy table shows only that
evaluation's numbers, one setting for every policy. Outputs: OUT/report.md and OUT/plots/*.png; the tables
are printed too. Every plot has one scale per axis.
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
    """Every stage's summary (by the registry's file names), the timings, PPO's per-step metrics, the SFT and
    RM Trainers' log histories and the pipeline's evaluation."""
    from .pipeline_eval import RESULT
    from .stages import STAGES

    data = {name: _read_json(os.path.join(out, name, stage.summary_file)) for name, stage in STAGES.items()}
    histories = {f"{name}_log": _read_json(os.path.join(out, name, "trainer_state.json")).get("log_history", [])
                 for name in ("sft", "reward")}
    return {**data, **histories, "timings": timings, "evaluation": _read_json(os.path.join(out, RESULT)),
            "metrics": _read_metrics(os.path.join(out, "ppo", "metrics.jsonl"))}


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


# (column title, key in rlhf.evaluation's per-model figures)
POLICY_COLUMNS = (("RM reward (normalized)", "rm_reward_normalized"), ("RM reward (raw)", "rm_reward_raw"),
                  ("gold reward", "gold_reward"), ("KL to ref", "kl"), ("EOS rate", "eos_rate"),
                  ("length", "response_length"))


def policy_table(evaluation: dict) -> list[str]:
    """The policies of the pipeline's evaluation, one row each, with the setting they share."""
    if not evaluation:
        return []
    columns = [(title, key) for title, key in POLICY_COLUMNS
               if any(key in m for m in evaluation["models"].values())]
    lines = [f"policies on the same {evaluation['n_prompts']} held-out prompts, temperature "
             f"{evaluation['temperature']}, up to {evaluation['max_new_tokens']} new tokens, seed {evaluation['seed']}; "
             f"KL (nats per reply) to {evaluation['reference']}; length in tokens",
             f"{'policy':<8}" + "".join(f"{title:>{len(title) + 2}}" for title, _ in columns)]
    for label, m in evaluation["models"].items():
        lines.append(f"{label:<8}" + "".join(f"{_fmt(m.get(key)):>{len(title) + 2}}" for title, key in columns))
    return lines


def format_table(data: dict) -> str:
    lines = [f"{'stage':<14}{'seconds':>9}  key figures"]
    lines += [f"{s:<14}{sec:>9}  {figures}" for s, sec, figures in summary_rows(data)]
    policies = policy_table(data["evaluation"])
    return "\n".join(lines + ([""] + policies if policies else []))


def _loss_points(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry]
    return [s for s, _ in points], [v for _, v in points]


def make_plots(data: dict, plot_dir: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    metrics, paths = data["metrics"], {}

    def save(name, fig):
        fig.tight_layout()
        paths[name] = os.path.join(plot_dir, f"{name}.png")
        fig.savefig(paths[name], dpi=100)
        plt.close(fig)

    if metrics:
        steps = [m["step"] for m in metrics]
        has_gold = "objective/gold_reward" in metrics[0]
        panels = 3 if has_gold else 2
        fig, axes = plt.subplots(panels, 1, figsize=(6, 2.4 * panels), sharex=True)
        axes[0].plot(steps, [m["objective/scores"] for m in metrics], label="RM reward (normalized)")
        axes[0].plot(steps, [m["objective/rlhf_reward"] for m in metrics], label="shaped: RM reward - beta*KL")
        axes[0].set_ylabel("RM reward\n(normalized, z-score)")
        axes[0].legend(fontsize=8)
        axes[0].set_title("PPO training: one panel per scale (rollout means)")
        if has_gold:
            axes[1].plot(steps, [m["objective/gold_reward"] for m in metrics], color="tab:green", label="gold reward")
            axes[1].set_ylabel("gold reward\n(demo task score)")
            axes[1].legend(fontsize=8)
        axes[-1].plot(steps, [m["objective/kl"] for m in metrics], color="tab:grey", label="KL to reference")
        axes[-1].set_ylabel("KL\n(nats per reply)")
        axes[-1].set_xlabel("PPO step")
        axes[-1].legend(fontsize=8)
        save("reward_kl", fig)

        fig, ax = plt.subplots(figsize=(7, 5))
        kl = [m["objective/kl"] for m in metrics]
        proxy = ax.plot(kl, [m["objective/scores"] for m in metrics], "o-", ms=3, lw=1, alpha=0.6, color="tab:blue",
                        label="proxy: RM reward (normalized), left axis")
        marks = ax.scatter(kl, [m["objective/scores"] for m in metrics], c=steps, cmap="viridis", s=18, zorder=3)
        ax.set_xlabel("KL to reference (nats per reply)")
        ax.set_ylabel("RM reward (normalized, z-score)", color="tab:blue")
        lines = proxy
        # the colour bar first, below the plot: the twin axis then takes the same (shrunk) place as ax
        fig.colorbar(marks, ax=ax, orientation="horizontal", pad=0.2, aspect=40).set_label(
            "PPO step (the lines join the steps in order)")
        if has_gold:
            twin = ax.twinx()
            lines += twin.plot(kl, [m["objective/gold_reward"] for m in metrics], "s-", ms=3, lw=1, alpha=0.6,
                               color="tab:green", label="gold reward, right axis")
            twin.scatter(kl, [m["objective/gold_reward"] for m in metrics], c=steps, cmap="viridis", s=18,
                         marker="s", zorder=3)
            twin.set_ylabel("gold reward (demo task score)", color="tab:green")
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
        ax.set_title("proxy vs gold reward as KL grows\n(over-optimisation shows as the two parting)")
        save("proxy_vs_gold", fig)

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(steps, [m["rollout/response_length"] for m in metrics], label="mean reply length")
        ax.set_xlabel("PPO step")
        ax.set_ylabel("tokens per reply")
        ax.legend(fontsize=8)
        ax.set_title("PPO rollout reply length")
        save("response_length", fig)
    rm = data["reward"]
    if "eval/accuracy" in rm:
        accuracy, n = rm["eval/accuracy"], rm.get("eval/n", rm.get("eval_pairs"))
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.bar(["held-out pairs"], [accuracy], color="tab:green", label="reward model")
        ax.text(0, accuracy + 0.02, f"{accuracy:.3f} (n={n})", ha="center")
        ax.axhline(0.5, color="grey", linestyle="--", label="chance (0.5)")
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("accuracy (share of pairs\nwith chosen scored higher)")
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title("reward model held-out accuracy")
        save("rm_accuracy", fig)
    curves = [(name, title, ylabel) for name, title, ylabel in
              (("sft", "SFT", "loss (cross-entropy,\nnats per token)"),
               ("reward", "reward model", "loss (-log sigmoid\nof the margin)"))
              if data[f"{name}_log"]]
    if curves:
        fig, axes = plt.subplots(len(curves), 1, figsize=(6, 2.8 * len(curves)), squeeze=False)
        for ax, (name, title, ylabel) in zip(axes[:, 0], curves):
            for key, label, style in (("loss", "training loss", "-"), ("eval_loss", "held-out loss", "o--")):
                x, y = _loss_points(data[f"{name}_log"], key)
                if x:
                    ax.plot(x, y, style, label=label)
            ax.set_title(f"{title} training loss")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
        save("training_loss", fig)
    return paths


TITLES = {"reward_kl": "PPO training: RM reward, gold reward and KL",
          "proxy_vs_gold": "Proxy (RM) reward against gold reward as KL grows (over-optimisation shows as "
                           "the two parting)",
          "response_length": "Response length", "rm_accuracy": "Reward-model held-out accuracy",
          "rm_calibration": "Reward-model calibration (per subset, with pairs per bin)",
          "training_loss": "SFT and reward-model training loss"}


def write_report(out: str, timings: dict, group: str) -> str:
    data = collect(out, timings)
    table = format_table(data)
    print("\n" + table)
    plots = make_plots(data, os.path.join(out, "plots"))
    calibration = os.path.join(out, "reward", "calibration.png")
    if os.path.exists(calibration):
        plots["rm_calibration"] = calibration
    lines = ["# RLHF pipeline report", "", f"W&B group: `{group}`; outputs in `{out}`.", "", "```", table, "```", ""]
    if data["evaluation"]:
        lines += ["Every policy above was sampled by the pipeline's evaluation with one setting "
                  "(`evaluation/evaluation.json`; replies side by side in `evaluation/generations.jsonl`). "
                  "RM reward (normalized) is the z-score PPO optimises; RM reward (raw) is the score head's output.", ""]
    for name, path in plots.items():
        lines += [f"## {TITLES[name]}", "", f"![{name}]({os.path.relpath(path, out)})", ""]
    report = os.path.join(out, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({k: v for k, v in data.items() if k not in ("metrics", "sft_log", "reward_log")}, f, indent=2)
    return report
