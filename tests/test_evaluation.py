"""rlhf/evaluation.py: metric units, the shared reply figures, then ``rlhf eval`` run as a user runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.evaluation import bleu, distinct_n, logits_fn, main, rouge_l, sequence_kl, win_rate

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-new-tokens", "12", "--batch-size", "8"]


def run_eval(*args: str) -> subprocess.CompletedProcess:
    """``python -m rlhf eval ARGS`` (the ``rlhf eval`` command), with the session's RLHF_HOME."""
    return subprocess.run([sys.executable, "-m", "rlhf", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=180, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_distinct_n_counts_unique_ngrams_over_all_replies():
    assert distinct_n(["a b a b"], 1) == 0.5  # a, b of a b a b
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba of ab ba ab
    assert distinct_n(["a b", "a b"], 2) == 0.5  # pooled over replies, not averaged per reply
    assert distinct_n(["Hi, you."], 1) == 1.0  # punctuation is its own token
    assert distinct_n(["", "one"], 2) == 0.0  # no bigram at all: 0, not a division by zero


def test_win_rate_counts_ties_as_half():
    counts = win_rate([1, 2, 3, 3], [0, 2, 4, 3])
    assert {k: counts[k] for k in ("win_rate", "wins", "ties", "losses")} == {"win_rate": 0.5, "wins": 1, "ties": 2,
                                                                             "losses": 1}
    assert win_rate([1.0, 1.0], [0.0, 0.0])["win_rate"] == 1.0
    assert win_rate([0.0, 2.0, 5.0], [1.0, 2.0, 5.0])["win_rate"] == pytest.approx(1 / 3)


def test_bleu_and_rouge_l_on_hand_known_cases():
    ref = ["the cat sat on the mat today", "a refund was issued for your kettle"]
    assert bleu(ref, ref) == pytest.approx(100.0)
    assert rouge_l(ref, ref) == pytest.approx(1.0)
    assert bleu(["dogs run fast"], ["the cat sat on the mat"]) == 0.0
    assert rouge_l(["dogs run fast"], ["the cat sat on the mat"]) == 0.0
    # LCS "the cat sat" = 3 words: precision 3/3, recall 3/6, F = 2/3
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)


def test_kl_is_zero_against_itself_on_the_exact_sampled_tokens():
    from rlhf.data import load_records
    from rlhf.data.demo_task import demo_data_paths
    from rlhf.generation import Sampling, generate_replies, stop_token_ids
    from rlhf.models import load_causal_lm, load_tokenizer

    prompts = [r["prompt"] for r in load_records(demo_data_paths(0)["prompts_eval"], kind="prompt")[0][:6]]
    model, tok = load_causal_lm("tiny:demo"), load_tokenizer("tiny:demo")
    gens = generate_replies(model, tok, prompts, Sampling(10, stop_token_ids=stop_token_ids(tok)), batch_size=4, seed=3)
    assert [tok.decode(i, skip_special_tokens=True) for i in gens.token_ids] == gens.responses
    same = logits_fn(model)
    assert sequence_kl(same, same, tok, gens, 0.7, batch_size=4) == [0.0] * 6
    other = load_causal_lm("tiny:demo")
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # tied to the embeddings: a different distribution everywhere
    for temperature in (1.0, 0.0):  # greedy replies: KL at T = 1, never NaN
        kl = sequence_kl(same, logits_fn(other), tok, gens, temperature, batch_size=4)
        assert all(math.isfinite(x) for x in kl) and sum(kl) != 0


@pytest.fixture(scope="module")
def perturbed_policy(tmp_path_factory) -> str:
    """The tiny model with noise on every weight: another policy over the same tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models import resolve_model_path

    base, out = resolve_model_path("tiny:demo"), str(tmp_path_factory.mktemp("perturbed"))
    model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_cli_same_model_and_seed_ties_everywhere(tiny_reward_model, tmp_path):
    from rlhf.data.demo_task import demo_data_paths

    result = run_eval("--policy", "tiny:demo", "--baseline", "tiny:demo", "--prompts",
                      demo_data_paths(0)["prompts_eval"], "--reward-model", tiny_reward_model,
                      "--max-prompts", "6", *FAST, "--json", "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json(result.stdout)
    policy, baseline = out["models"]["policy"], out["models"]["baseline"]
    assert out["n_prompts"] == 6 and out["gold"] and not out["references"]
    assert out["win_rate"]["rm_reward_normalized"] == {"win_rate": 0.5, "wins": 0, "ties": 6, "losses": 0,
                                                       "ci95": pytest.approx([0.188, 0.812], abs=1e-3)}
    assert out["win_rate"]["gold_reward"]["win_rate"] == 0.5
    assert policy["kl"] == baseline["kl"] == 0.0
    assert policy == baseline  # identical replies, identical figures
    table = result.stdout
    assert "policy    baseline" in table and "by rm_reward_normalized" in table and "ties 6" in table


def test_cli_different_policy_on_sft_data_reports_every_metric(tiny_reward_model, perturbed_policy, tmp_path):
    from rlhf.data.demo_task import demo_data_paths

    output = tmp_path / "eval.json"
    result = run_eval("--policy", perturbed_policy, "--baseline", "tiny:demo", "--prompts",
                      demo_data_paths(0)["sft_eval"], "--reward-model", tiny_reward_model,
                      "--max-prompts", "6", *FAST, "--output", output, "--output-dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(output.read_text())
    assert out["references"] and out["gold"] and out["format"] == "messages"
    for label in ("policy", "baseline"):
        m = out["models"][label]
        for key in ("rm_reward_normalized", "rm_reward_raw", "gold_reward", "kl", "response_length", "eos_rate",
                    "distinct_1", "distinct_2", "bleu", "rouge_l"):
            assert math.isfinite(m[key]), (label, key, m[key])
        assert 0 <= m["bleu"] <= 100 and 0 <= m["rouge_l"] <= 1 and 0 <= m["eos_rate"] <= 1
    assert out["models"]["baseline"]["kl"] == 0.0  # the baseline is the default reference
    assert out["models"]["policy"]["kl"] != 0.0
    assert set(out["win_rate"]) == {"rm_reward_normalized", "gold_reward"}
    assert all(sum(w[k] for k in ("wins", "ties", "losses")) == 6 for w in out["win_rate"].values())
    for key in ("bleu", "rouge_l", "kl", "win rate of policy over baseline", "95% CI ["):
        assert key in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and json.loads((tmp_path / "eval" / "eval.json").read_text())["n_prompts"] == 6
    assert all(set(r) == {"prompt", "reference", "policy", "baseline"} for r in rows)  # side by side, per prompt
    assert all(isinstance(r[m]["response"], str) and "gold_reward" in r[m] for r in rows for m in ("policy", "baseline"))
    assert sum(r["policy"]["gold_reward"] for r in rows) / 6 == pytest.approx(out["models"]["policy"]["gold_reward"])


def test_wilson_interval_matches_the_textbook_values():
    from rlhf.evaluation import wilson_interval

    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the standard worked example
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_cli_malformed_prompts_file_names_file_and_record(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "Where is my laptop order?"}\n{"prompt": 5}\n{"prompt": \n')
    result = run_eval("--policy", "tiny:demo", "--baseline", "tiny:demo", "--prompts", bad)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ")
    assert f"{bad}:record 3" in result.stderr


def test_bad_fields_gold_on_non_demo_prompts_and_bad_options_fail_cleanly(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Where is my laptop order?"}\n{"prompt": 5}\n')
    common = ["--policy", "tiny:demo", "--baseline", "tiny:demo", "--prompts", str(prompts)]
    assert main(common) == 1
    assert f"{prompts}:record 2: field 'prompt'" in capsys.readouterr().err
    prompts.write_text('{"prompt": "Write a haiku about the sea."}\n')
    assert main([*common, "--gold", "on"]) == 1
    assert "not a demo-task prompt" in capsys.readouterr().err
    assert main([*common, "--max-prompts", "0"]) == 2
    assert main([*common, "--policy", str(tmp_path / "missing")]) == 1
    assert "missing: cannot load the model: no such model directory" in capsys.readouterr().err
