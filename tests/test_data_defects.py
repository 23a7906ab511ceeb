"""Defect classes end in errors naming file, record and field; documented policies are counted;
splits, prompts and statistics."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from rlhf.data import (
    POLICIES,
    DataFormatError,
    LoadReport,
    load_records,
    prompt_of,
    split_records,
    turn_stats,
)
from tests.data_helpers import FIXTURES, HH_PAIR, assistant, load, problems_of, system, user, write


# defect classes: a clear error naming file, record and field
def _bad_cases():
    ok = {"instruction": "i", "input": "", "output": "o"}
    return {
        "missing_field": ([ok, {"instruction": "i", "input": ""}], "record 2: field 'output': missing"),
        "null_field": ([ok, {"instruction": None, "output": "o"}], "record 2: field 'instruction': missing"),
        "mistyped_field": ([ok, ok, {"instruction": 42, "output": "o"}],
                           "record 3: field 'instruction': expected str, got int"),
        "mistyped_input": ([{"instruction": "i", "input": ["x"], "output": "o"}],
                           "record 1: field 'input': expected str, got list"),
        "bad_history": ([{"instruction": "i", "output": "o", "history": [["q"]]}],
                        "record 1: field 'history[0]': expected a [question, answer] pair of strings"),
        "mistyped_messages": ([{"messages": {"role": "user"}}], "record 1: field 'messages': expected list, got dict"),
        "message_not_object": ([{"messages": ["hello"]}],
                               "record 1: field 'messages[0]': expected a message object, got str"),
        "missing_role": ([{"messages": [{"content": "x"}]}], "record 1: field 'messages[0].role': missing or not a string"),
        "unknown_role": ([{"conversations": [{"from": "narrator", "value": "x"}]}],
                         "record 1: field 'conversations[0].from': unknown role 'narrator'"),
        "missing_content": ([{"conversations": [{"from": "human"}]}],
                            "record 1: field 'conversations[0].value': missing"),
        "mistyped_content": ([{"messages": [{"role": "user", "content": {"a": 1}}]}],
                             "record 1: field 'messages[0].content': content must be a string or a list of text parts"),
        "mistyped_chosen": ([{"prompt": "p", "chosen": 1.5, "rejected": "r"}],
                            "record 1: field 'chosen': expected str or list or dict, got float"),
        "hh_not_transcript": ([{"chosen": "just text", "rejected": "other"}],
                              "record 1: field 'chosen': not an HH-RLHF transcript"),
        "reply_not_assistant": ([{"prompt": "p", "chosen": [user("x")], "rejected": "r"}],
                                "record 1: field 'chosen': expected the assistant response"),
        "empty_reply_list": ([{"prompt": "p", "chosen": [], "rejected": "r"}],
                             "record 1: field 'chosen': empty: expected the assistant response"),
        "lone_surrogate": ([{"messages": [user("a\ud800b"), assistant("c")]}],
                           "record 1: message 0: content holds a lone surrogate"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
@pytest.mark.parametrize("name", ["bad.jsonl", "bad.json"])
def test_field_defects_name_file_record_and_field(tmp_path, case, name):
    records, expected = _bad_cases()[case]
    path = write(tmp_path / name, records, "json" if name.endswith(".json") else "jsonl")
    with pytest.raises(DataFormatError) as e:
        load_records(path)
    assert len(problems_of(e)) == 1
    problem = problems_of(e)[0]
    assert problem.startswith(f"{path}:record "), problem
    assert expected in problem, problem


RAW_CASES = {
    # name: (file name, raw bytes, expected message fragment after the path)
    "bad_json_line": ("f.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n',
                      ":record 3: invalid JSON on line 3: Expecting property name"),
    "bad_json_in_list": ("f.json", b'[\n {"prompt": "a"},\n {"prompt" "b"}\n]',
                         ":record 2 (line 3): invalid JSON: Expecting ':' delimiter"),
    "truncated_json_list": ("f.json", b'[{"prompt": "a"}, {"prompt": "b"',
                            ":record 2 (line 1): invalid JSON"),
    "non_object_line": ("f.jsonl", b'{"prompt": "a"}\n["prompt", "b"]\n',
                        ":record 2: expected a JSON object, got list"),
    "non_object_in_list": ("f.json", b'[{"prompt": "a"}, "b"]', ":record 2: expected a JSON object, got str"),
    "non_utf8_in_string_jsonl": ("f.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n',
                                 ":record 2: field 'prompt': bytes that are not valid UTF-8"),
    "non_utf8_in_string_json": ("f.json", b'[{"prompt": "a"}, {"x": 1, "prompt": "\xff\xfe"}]',
                                ":record 2: field 'prompt': bytes that are not valid UTF-8"),
    "non_utf8_nested": ("f.jsonl", b'{"messages": [{"role": "user", "content": "\xc3("}]}\n',
                        ":record 1: field 'messages[0].content': bytes that are not valid UTF-8"),
    "non_utf8_outside_strings": ("f.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\xff\n',
                                 ":record 2: byte offset 31: bytes that are not valid UTF-8"),
    "latin1_file": ("f.json", '[{"instruction": "café", "output": "crème"}]'.encode("latin-1"),
                    ":record 1: field 'instruction': bytes that are not valid UTF-8"),
    "utf16_file": ("f.jsonl", '{"prompt": "a"}\n'.encode("utf-16"), ":line 1: byte offset 0: bytes that are not valid"),
    "empty_file": ("f.jsonl", b"", ": the file holds no records (empty file)"),
    "blank_file": ("f.json", b"  \n\n \t\n", ": the file holds no records (empty file)"),
    "empty_list": ("f.json", b"[]", ": the file holds no records (empty file)"),
    "bom_only": ("f.jsonl", b"\xef\xbb\xbf", ": the file holds no records (empty file)"),
    "scalar_document": ("f.json", b"42", ": expected a JSON list of objects or one object, got int"),
    "deeply_nested": ("f.json", b"[" * 100000 + b"]" * 100000, ":record 1 (line 1): invalid JSON: nested too deeply"),
    "deeply_nested_line": ("f.jsonl", b'{"prompt": "a"}\n' + b"[" * 100000 + b"]" * 100000,
                           ":record 2: invalid JSON on line 2: nested too deeply"),
    "huge_integer": ("f.jsonl", b'{"prompt": "a"}\n{"prompt": ' + b"9" * 5000 + b"}\n",
                     ":record 2: invalid JSON on line 2: Exceeds the limit (4300 digits)"),
    "huge_integer_in_list": ("f.json", b'[{"prompt": "a"}, {"prompt": ' + b"9" * 5000 + b"}]",
                             ":record 2 (line 1): invalid JSON: Exceeds the limit"),
    "trailing_garbage": ("f.json", b'[{"prompt": "a"}] x', ":line 1: invalid JSON: Extra data (column 19)"),
    "truncated_gzip": ("f.jsonl.gz", gzip.compress(b'{"prompt": "a"}\n' * 50)[:40], ": cannot be read:"),
    "corrupt_parquet": ("f.parquet", b"PAR1 this is not parquet PAR1", ": not a readable parquet file"),
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_malformed_files_name_file_and_record(tmp_path, case):
    name, raw, expected = RAW_CASES[case]
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(DataFormatError) as e:
        load_records(path)
    problem = problems_of(e)[0]
    assert problem.startswith(str(path)), problem
    assert expected in problem, problem


def test_every_problem_is_reported_at_once_up_to_a_limit(tmp_path):
    records = [{"instruction": i} for i in range(30)]
    with pytest.raises(DataFormatError) as e:
        load(tmp_path, records)
    assert len(problems_of(e)) == 20
    assert str(e.value).startswith("30 problem(s) in the input:") and "... and 10 more" in str(e.value)
    lines = "".join(f'{{"prompt": "ok"}}\n{{bad {i}\n' for i in range(3))
    (tmp_path / "many.jsonl").write_text(lines, encoding="utf-8")
    with pytest.raises(DataFormatError) as e:
        load_records(tmp_path / "many.jsonl")
    assert [p.split(": ")[0] for p in problems_of(e)] == [f"{tmp_path / 'many.jsonl'}:record {n}" for n in (2, 4, 6)]


def test_all_records_skipped_is_an_error_with_the_reasons(tmp_path):
    with pytest.raises(DataFormatError, match=r"every record was skipped \(\{'empty_response': 2\}\)"):
        load(tmp_path, [{"instruction": "a", "output": ""}, {"instruction": "b", "output": "<nooutput>"}])


# documented policies: every one is exercised and counted per kept record
def test_alpaca_placeholders_and_empty_outputs(tmp_path):
    records = [
        {"instruction": "a", "input": "No input", "output": "1"},
        {"instruction": "b", "input": "<noinput>", "output": "2"},
        {"instruction": "c", "input": "N/A", "output": "3"},
        {"instruction": "d", "input": "无输入", "output": "4"},
        {"instruction": "e", "input": "No input.", "output": ""},  # skipped: its repair is not counted
        {"instruction": "f", "input": "", "output": "<nooutput>"},
        {"instruction": "g", "input": "", "output": "&lt;无输出&gt;"},
        {"instruction": "h", "input": "", "output": "  <No Output>  "},
        {"instruction": "", "input": "  ", "output": "x"},
        {"instruction": "i", "input": "Nothing", "output": "5"},
    ]
    loaded, report = load(tmp_path, records, "a.json")
    assert [r["messages"][0]["content"] for r in loaded] == ["a", "b", "c", "d", "i\n\nNothing"]
    assert report.skipped == Counter(empty_response=4, empty_prompt=1)
    assert report.repaired == Counter(placeholder_input=4)


def test_sft_conversation_policies(tmp_path):
    long = "x" * 2001
    records = [
        {"messages": [user("q"), user("more"), assistant("a"), assistant("b"), user("trailing")]},
        {"messages": [user("q"), {"role": "tool", "content": "{}"}, assistant("a")]},
        {"messages": [system("s"), user("q")]},
        {"messages": [user("q"), assistant("   ")]},
        {"messages": [user(" "), assistant("a")]},
        {"messages": [user(long), assistant("a")]},
        {"messages": [user("q"), assistant("a"), user("trailing")]},
    ]
    loaded, report = load(tmp_path, records)
    assert loaded[0]["messages"] == [user("q\n\nmore"), assistant("a\n\nb")]
    assert report.skipped == Counter(unsupported_role=1, no_assistant_turn=1, empty_response=1, empty_prompt=1)
    # per record: record 1 merged twice and dropped a trailing turn, record 7 dropped one
    assert report.repaired == Counter(merged_same_role_turns=1, trailing_turns_dropped=2)
    assert report.noted == Counter(long_text=1)


def test_exact_duplicates_are_skipped_after_conversion(tmp_path):
    records = [
        {"instruction": "a", "input": "", "output": "1"},
        {"instruction": "a", "input": "", "output": "1"},  # exact duplicate
        {"instruction": "a", "input": "No input", "output": "1", "id": 3},  # same after conversion
        {"instruction": "a ", "input": "", "output": "1"},  # not exact: kept
    ]
    loaded, report = load(tmp_path, records)
    assert len(loaded) == 2 and report.skipped == Counter(duplicate=2)
    assert report.repaired == Counter()  # the repaired record was a duplicate, so not kept
    assert len(load(tmp_path, records, dedup=False)[0]) == 4


def test_every_documented_policy_is_reachable(tmp_path):
    """Run small files that trigger each policy and check the reasons seen are exactly POLICIES."""
    files = {
        "sft.jsonl": [
            {"messages": [user("q"), user("q2"), assistant("a"), user("t")]},
            {"messages": [user("q"), {"role": "function", "content": "x"}, assistant("a")]},
            {"messages": [user("q")]},
            {"messages": [user("q"), assistant("")]},
            {"messages": [user(""), assistant("a")]},
            {"messages": [user("q"), assistant("y" * 3000)]},
            {"messages": [user("q"), assistant("y" * 3000)]},
        ],
        "alpaca.json": [{"instruction": "q", "input": "N/A", "output": "o"}],
        "hh.jsonl": [
            HH_PAIR, {"chosen": HH_PAIR["chosen"], "rejected": HH_PAIR["chosen"]},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"},
            {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: b"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:"},
        ],
        "pref.jsonl": [
            {"prompt": "p", "chosen": [user("p"), assistant("a")], "rejected": "b"},
            {"prompt": [user("p"), assistant("x")], "chosen": "a", "rejected": "b"},
        ],
    }
    seen = set()
    for name, records in files.items():
        _, report = load(tmp_path, records, name)
        seen |= {f"{title}/{reason}" for title, counter in
                 (("skipped", report.skipped), ("repaired", report.repaired), ("noted", report.noted))
                 for reason in counter}
    assert seen == set(POLICIES)


def test_report_summary_and_dict(tmp_path):
    _, report = load(tmp_path, [HH_PAIR, HH_PAIR])
    assert report.summary_lines() == [
        f"{tmp_path / 'data.jsonl'}: format=hh kind=preference read=2 kept=1 skipped=1",
        "  skipped  duplicate: 1",
    ]
    assert report.to_dict() == {"source": str(tmp_path / "data.jsonl"), "format": "hh", "kind": "preference",
                                "records_read": 2, "records_kept": 1, "skipped": {"duplicate": 1},
                                "repaired": {}, "noted": {}}
    assert isinstance(report, LoadReport)


# splits, prompts and statistics
def _sft(n, repeats=1):
    return [{"messages": [user(f"question {i // repeats}"), assistant(f"answer {i}")]} for i in range(n)]


def test_split_is_deterministic_order_independent_and_keeps_prompts_together():
    records = _sft(1000, repeats=4)  # 250 prompts, 4 answers each
    train, held = split_records(records, 0.2, seed=1)
    assert (train, held) == split_records(records, 0.2, seed=1)
    assert len(train) + len(held) == 1000 and 100 <= len(held) <= 300
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    shuffled = records[::-1][500:] + records[::-1][:500]
    train2, held2 = split_records(shuffled, 0.2, seed=1)
    assert sorted(map(key, train2)) == sorted(map(key, train)) and sorted(map(key, held2)) == sorted(map(key, held))
    train_prompts = {json.dumps(prompt_of(r)) for r in train}
    assert not train_prompts & {json.dumps(prompt_of(r)) for r in held}
    assert split_records(records, 0.2, seed=2) != (train, held)
    # relative order is kept
    assert [records.index(r) for r in held] == sorted(records.index(r) for r in held)


def test_split_edge_cases():
    assert split_records(_sft(5), 0.0) == (_sft(5), [])
    assert split_records([], 0.3) == ([], [])
    for n in (2, 3, 5):  # tiny sets: both halves non-empty, prompts still never straddle
        train, held = split_records(_sft(n), 0.1)
        assert train and held and len(train) + len(held) == n
        train, held = split_records(_sft(n), 0.9)
        assert train and held
    for fraction in (0.01, 0.5, 0.99):  # one prompt only: it cannot be split, so it all trains
        assert split_records(_sft(4, repeats=4), fraction) == (_sft(4, repeats=4), [])
        assert split_records(_sft(1), fraction) == (_sft(1), [])
    pairs = [{"prompt": [user(f"p{i}")], "chosen": [assistant("a")], "rejected": [assistant("b")]} for i in range(50)]
    train, held = split_records(pairs, 0.3)
    assert len(train) + len(held) == 50 and held
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match="eval_fraction"):
            split_records(pairs, bad)


def test_prompt_of_and_turn_stats():
    sft = {"messages": [system("s"), user("q"), assistant("a"), user("q2"), assistant("a2")]}
    assert prompt_of(sft) == sft["messages"][:4]
    assert prompt_of({"messages": [user("only")]}) == [user("only")]
    pair = {"prompt": [user("p")], "chosen": [assistant("abc")], "rejected": [assistant("d")]}
    assert prompt_of(pair) == [user("p")]
    stats = turn_stats([sft, pair])
    assert stats == {"turns_min": 2, "turns_mean": 3.5, "turns_max": 5, "multi_turn_records": 1,
                     "chars_mean": 5.5, "chars_max": 7, "messages_by_role": {"system": 1, "user": 3, "assistant": 3}}
    assert turn_stats([]) == {}


def test_fixture_files_load_with_expected_counts():
    expected = {
        "alpaca_sample.json": ("alpaca", 9, 6, {"empty_response": 3}, {"placeholder_input": 2}),
        "alpaca_zh_sample.json": ("alpaca", 7, 5, {"empty_response": 2}, {"placeholder_input": 1}),
        "hh_sample.jsonl.gz": ("hh", 9, 6, {"identical_pair": 2, "no_final_response": 1},
                               {"merged_same_role_turns": 3}),
        "dpo_zh_sample.jsonl": ("sharegpt_preference", 5, 5, {}, {}),
    }
    for name, (fmt, read, kept, skipped, repaired) in expected.items():
        records, report = load_records(FIXTURES / name)
        assert (report.format, report.records_read, report.records_kept) == (fmt, read, kept), name
        assert dict(report.skipped) == skipped and dict(report.repaired) == repaired, name
        assert len(records) == kept
