"""Where a stage's runs go: W&B offline with the `wandb sync` line, and TensorBoard event files (report_to)."""

import re

from rlhf.tracking import where_runs_went
from tests.conftest import REPO, run_cli
from tests.ppo_support import PPO_YAML, ok, small


def scalar_tags(log_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_ppo_logs_to_tensorboard_and_wandb_offline_and_says_how_to_sync(tmp_path):
    out = tmp_path / "ppo"
    log = ok(run_cli(["-m", "rlhf", "ppo", "--config", PPO_YAML, f"output_dir={out}",
                      *small(), "report_to=wandb", "tensorboard"], timeout=300))  # a list: --report_to A B
    assert {"objective/kl", "objective/gold_reward", "loss/policy_avg"} <= scalar_tags(out / "tensorboard")
    synced = re.search(r"W&B ran offline: the run is in (\S+); upload it with `wandb sync (\S+)`", log)
    assert synced and synced[1] == synced[2] and (out / "wandb").samefile(synced[1] + "/..")
    assert f"TensorBoard logs in {out}/tensorboard; view them with `tensorboard --logdir {out}/tensorboard`" in log


def test_sft_reports_to_tensorboard_natively_and_no_wandb_line_without_wandb(tmp_path):
    out = tmp_path / "sft"
    log = ok(run_cli(["-m", "rlhf", "sft", "--config", str(REPO / "configs/demo/sft.yaml"), f"output_dir={out}",
                      "report_to=tensorboard", "max_steps=2", "logging_steps=1", "gold_eval_prompts=2",
                      "eval_strategy=no"], timeout=300))
    (board,) = {p.parent for p in out.glob("runs/**/events.out.tfevents.*")}  # transformers' TensorBoardCallback
    assert "train/loss" in scalar_tags(board)
    assert "W&B ran offline" not in log and "TensorBoard logs in" in log and not (out / "wandb").exists()


def test_where_runs_went_is_silent_without_local_records(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert where_runs_went(str(tmp_path)) == []
    (tmp_path / "wandb" / "offline-run-20260101_000000-abc").mkdir(parents=True)
    (line,) = where_runs_went(str(tmp_path))
    assert line.endswith(f"`wandb sync {tmp_path}/wandb/offline-run-20260101_000000-abc`")


def test_a_new_score_head_is_quiet_and_any_other_load_problem_still_shows():
    from rlhf.expected_noise import only_a_new_score_head

    report = "Model LOAD REPORT from: x\nKey          | Status  | \n-------------+---------+-\n{rows}\nNotes: ..."
    assert only_a_new_score_head(report.format(rows="score.weight | \x1b[31mMISSING\x1b[0m | "))
    assert not only_a_new_score_head(report.format(rows="score.weight | MISSING | \nmodel.norm.weight | MISSING | "))
    assert not only_a_new_score_head(report.format(rows="score.weight | UNEXPECTED | "))
    assert not only_a_new_score_head("some other warning")
    code = ("from reward_models.train import load_reward_model; from rlhf.models import resolve_model_path;"
            "load_reward_model(resolve_model_path('tiny:demo'), None, None, False)")
    quiet = run_cli(["-c", code], timeout=120)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "MISSING" not in quiet.stderr and "LOAD REPORT" not in quiet.stderr
    loud = run_cli(["-c", code.replace("load_reward_model(", "__import__('rlhf.expected_noise').expected_noise"
                                       ".new_score_head_expected = __import__('contextlib').nullcontext; load_reward_model(")],
                   timeout=120)
    assert "score.weight" in loud.stderr and "MISSING" in loud.stderr  # the report exists; only ours hides it
