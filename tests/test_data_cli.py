"""``rlhf data inspect`` run as a user runs it: a subprocess, exit status, stdout and stderr."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def inspect(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "rlhf", "data", "inspect", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", timeout=120, cwd=cwd, env=env)


def assert_clean_failure(result: subprocess.CompletedProcess) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ")


REAL_EXPECTED = {
    # file: (summary line after the path, defect lines)
    "hh-rlhf/helpful-online-test.jsonl.gz": (
        "format=hh kind=preference read=1137 kept=1133 skipped=4",
        ["skipped  identical_pair: 2", "skipped  no_final_response: 2", "noted    empty_rejected: 3"]),
    "hh-rlhf/helpful-rejection-sampled-test.jsonl.gz": (
        "format=hh kind=preference read=2749 kept=2717 skipped=32",
        ["skipped  identical_pair: 32", "repaired merged_same_role_turns: 3"]),
    "alpaca/alpaca_first2k.json": (
        "format=alpaca kind=sft read=2000 kept=1993 skipped=7",
        ["skipped  empty_response: 7", "repaired placeholder_input: 25", "noted    long_text: 4"]),
    "zh/alpaca_zh_first1k.json": (
        "format=alpaca kind=sft read=1000 kept=998 skipped=2",
        ["skipped  empty_response: 2", "repaired placeholder_input: 9"]),
    "zh/dpo_zh_500.jsonl": ("format=sharegpt_preference kind=preference read=500 kept=500 skipped=0", []),
}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data directory {SHARED_DATA} is absent")
def test_inspect_real_files_in_one_call():
    names = sorted(REAL_EXPECTED)
    result = inspect(*(SHARED_DATA / n for n in names))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    blocks = result.stdout.split(str(SHARED_DATA) + "/")[1:]
    assert [b.split(":")[0] for b in blocks] == names
    for name, block in zip(names, blocks):
        summary, defects = REAL_EXPECTED[name]
        lines = block.splitlines()
        assert lines[0] == f"{name}: {summary}"
        for defect in defects:
            assert f"  {defect}" in lines, (name, defect)
        for stat in ("turns_min", "turns_mean", "turns_max", "multi_turn_records", "chars_mean", "messages_by_role"):
            assert any(line.split()[0] == stat for line in lines[1:]), (name, stat)


def test_inspect_fixtures_json_output():
    result = inspect(FIXTURES / "hh_sample.jsonl.gz", FIXTURES / "alpaca_zh_sample.json", "--json")
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["format"], r["records_read"], r["records_kept"]) for r in reports] == [("hh", 9, 6), ("alpaca", 7, 5)]
    assert reports[0]["skipped"] == {"identical_pair": 2, "no_final_response": 1}
    assert reports[0]["repaired"] == {"merged_same_role_turns": 3}
    assert reports[0]["noted"] == {"empty_rejected": 1}
    assert reports[1]["messages_by_role"] == {"user": 5, "assistant": 5}
    assert "无输入" not in result.stdout  # statistics only, never the records themselves


def test_inspect_max_records():
    result = inspect(FIXTURES / "alpaca_sample.json", "--max-records", "3")
    assert result.returncode == 0, result.stderr
    assert "read=3 kept=3 skipped=0" in result.stdout.splitlines()[0]


MALFORMED = {
    # case: (file name, bytes, expected message after the path)
    "bad_json_line": ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": "b"\n', ":record 2: invalid JSON on line 2"),
    "bad_json_in_list": ("bad.json", b'[{"prompt": "a"},\n {"prompt": b}]', ":record 2 (line 2): invalid JSON"),
    "missing_field": ("missing.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
                      ":record 2: field 'output': missing"),
    "mistyped_field": ("mistyped.json", b'[{"messages": [{"role": "user", "content": 5}]}]',
                       ":record 1: field 'messages[0].content': content must be a string"),
    "mistyped_top_field": ("mistyped.jsonl", b'{"prompt": "p", "chosen": 1, "rejected": "r"}\n',
                           ":record 1: field 'chosen': expected str or list or dict, got int"),
    "non_utf8": ("latin1.jsonl", '{"prompt": "ok"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"),
                 ":record 2: field 'prompt': bytes that are not valid UTF-8"),
    "empty_file": ("empty.jsonl", b"", ": the file holds no records (empty file)"),
    "gzip_truncated": ("cut.jsonl.gz", gzip.compress(b'{"prompt": "a"}\n' * 40)[:30], ": cannot be read"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_inspect_malformed_input_exits_non_zero_with_file_and_record(tmp_path, case):
    name, raw, expected = MALFORMED[case]
    path = tmp_path / name
    path.write_bytes(raw)
    result = inspect(path)
    assert_clean_failure(result)
    assert f"{path}{expected}" in result.stderr, result.stderr


def test_inspect_reports_good_files_and_fails_for_the_bad_one(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": 1, "output": "x"}\n', encoding="utf-8")
    result = inspect(FIXTURES / "dpo_zh_sample.jsonl", bad, FIXTURES / "alpaca_sample.json")
    assert_clean_failure(result)
    assert f"{bad}:record 1: field 'instruction': expected str, got int" in result.stderr
    assert "read=5 kept=5" in result.stdout and "read=9 kept=6" in result.stdout


def test_inspect_format_override(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "嗨"},
                                                   {"from": "human", "value": "再见"}],
                                 "chosen": "再见！", "rejected": "不"}, ensure_ascii=False) + "\n", encoding="utf-8")
    detected = inspect(pairs)
    assert detected.returncode == 0 and "format=sharegpt_preference kind=preference read=1 kept=1" in detected.stdout
    as_sft = inspect(pairs, "--format", "sharegpt")  # the conversation alone, its trailing user turn dropped
    assert as_sft.returncode == 0, as_sft.stderr
    assert "format=sharegpt kind=sft read=1 kept=1" in as_sft.stdout
    assert "repaired trailing_turns_dropped: 1" in as_sft.stdout
    wrong = inspect(pairs, "--format", "alpaca")
    assert_clean_failure(wrong)
    assert f"{pairs}:record 1: field 'instruction': missing" in wrong.stderr
    unknown = inspect(pairs, "--format", "csv")
    assert_clean_failure(unknown)
    assert "unknown format 'csv'" in unknown.stderr


def test_inspect_undetectable_format_suggests_override(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text('{"text": "hello"}\n', encoding="utf-8")
    result = inspect(path)
    assert_clean_failure(result)
    assert f"{path}:record 1: cannot tell the format from fields ['text']; pass --format" in result.stderr


def test_inspect_missing_file_and_unreachable_hub_name(tmp_path):
    result = inspect(tmp_path / "nope.jsonl", "no-such-owner-zz/no-such-dataset-zz")
    assert_clean_failure(result)
    assert f"{tmp_path / 'nope.jsonl'}: no such file" in result.stderr
    assert "no-such-owner-zz/no-such-dataset-zz: not a local file, and loading it from the Hugging Face Hub failed" \
        in result.stderr

