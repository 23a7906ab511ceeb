"""Containers (json, jsonl, gz, parquet, Hub), detection and format override, and Unicode round trips."""

from __future__ import annotations

import json

import pytest

from rlhf.data import (
    FORMATS,
    DataFormatError,
    detect_format,
    load_records,
)
from tests.data_helpers import assistant, load, problems_of, user, write


# containers and readers
def test_containers_give_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"messages": [user(f"q{i} 你好"), assistant(f"a{i} ✓")]} for i in range(3)]
    expected, _ = load(tmp_path, records, "x.jsonl")
    for name in ("x.json", "x.jsonl.gz", "x.json.gz"):
        assert load(tmp_path, records, name)[0] == expected, name
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "x.parquet")
    assert load_records(tmp_path / "x.parquet")[0] == expected
    assert load_records(str(tmp_path / "x.parquet"))[0] == expected
    (tmp_path / "x_jsonl_as.json").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    assert load_records(tmp_path / "x_jsonl_as.json")[0] == expected
    (tmp_path / "x_list_as.jsonl").write_text(json.dumps(records, indent=1), encoding="utf-8")
    assert load_records(tmp_path / "x_list_as.jsonl")[0] == expected
    (tmp_path / "x_wrapped.json").write_text(json.dumps({"version": 2, "data": records}), encoding="utf-8")
    assert load_records(tmp_path / "x_wrapped.json")[0] == expected
    (tmp_path / "gz_without_suffix.jsonl").write_bytes((tmp_path / "x.jsonl.gz").read_bytes())
    assert load_records(tmp_path / "gz_without_suffix.jsonl")[0] == expected


def test_a_single_record_object_is_one_record_not_a_wrapper(tmp_path):
    # a dict with one list field ("messages") is a record: its messages are not records themselves
    record = {"messages": [user("q"), assistant("a")]}
    for name in ("one.json", "one.jsonl"):
        (tmp_path / name).write_text(json.dumps(record, indent=2), encoding="utf-8")
        records, report = load_records(tmp_path / name)
        assert records == [record] and report.records_read == 1, name


def test_bom_blank_lines_crlf_and_line_separators(tmp_path):
    records = [{"instruction": "Say\u2028hi\u0085there\x1c", "input": "", "output": "ok\u2029"},
               {"instruction": "two", "input": "", "output": "2"}]
    body = "\r\n\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n\n  \n"
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    loaded, report = load_records(path)
    assert report.records_read == 2
    assert loaded[0]["messages"] == [user(records[0]["instruction"]), assistant("ok\u2029")]
    # concatenated files keep one BOM per part
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records[0]).encode() + b"\n\xef\xbb\xbf" + json.dumps(records[1]).encode())
    assert load_records(path)[0] == loaded


def test_jsonl_record_numbers_are_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n\n{"instruction": "a"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError) as e:
        load_records(path)
    assert problems_of(e) == [f"{path}:record 4: field 'output': missing"]


def test_max_records_and_path_objects(tmp_path):
    records = [{"prompt": f"p{i}"} for i in range(10)]
    loaded, report = load_records(write(tmp_path / "p.jsonl", records), max_records=4)
    assert report.records_read == 4 and [r["prompt"][0]["content"] for r in loaded] == ["p0", "p1", "p2", "p3"]
    assert report.source == str(tmp_path / "p.jsonl")


def test_hub_failure_is_a_data_format_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataFormatError) as e:
        load_records("no-such-owner/no-such-dataset")
    assert problems_of(e) == ["no-such-owner/no-such-dataset: not a local file, and loading it from the Hugging Face "
                              "Hub failed: ConnectionError: Couldn't reach the Hub (offline)"]


def test_hub_records_are_converted(monkeypatch):
    import datasets

    calls = []

    def fake(repo, config, split):
        calls.append((repo, config, split))
        return [{"prompt": "q", "chosen": "a", "rejected": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    pairs, report = load_records("owner/name:cfg", split="test", max_records=5)
    assert calls == [("owner/name", "cfg", "test[:5]")]
    assert pairs == [{"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}]


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/dir/missing", "./missing", "missing.csv"])
def test_missing_local_paths_are_not_sent_to_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFormatError, match="no such file"):
        load_records(name)


def test_directory_is_an_error(tmp_path):
    with pytest.raises(DataFormatError, match="is a directory"):
        load_records(tmp_path)


# detection and override
@pytest.mark.parametrize("record, expected", [
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"instruction": "i"}, "alpaca"),
    ({"messages": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"conversation": []}, "sharegpt"),
    ({"prompt": "p"}, "prompt"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"prompt": "p", "response": "c"}, "prompt_completion"),
    ({"prompt": "p", "messages": []}, "messages"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
    ({"prompt": "p", "chosen": "c"}, "preference"),
    ({"chosen": [], "rejected": []}, "implicit_preference"),
    ({"chosen": {"role": "user"}, "rejected": None}, "implicit_preference"),
    ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}, "hh"),
    ({"chosen": None, "rejected": "x"}, "hh"),
    ({"conversations": [], "chosen": "c", "rejected": "r"}, "sharegpt_preference"),
    ({"instruction": "i", "chosen": "c", "rejected": "r"}, "alpaca_preference"),
    ({"text": "plain"}, None),
    ({"chosen": 3, "rejected": 4}, None),
])
def test_detect_format(record, expected):
    assert detect_format(record) == expected
    assert expected is None or expected in FORMATS


def test_detection_is_by_majority_so_a_defective_first_record_is_named(tmp_path):
    records = [{"instruction": "a"}] + [{"instruction": "x", "input": "", "output": "y"}] * 3
    with pytest.raises(DataFormatError) as e:
        load(tmp_path, records)
    assert problems_of(e) == [f"{tmp_path / 'data.jsonl'}:record 1: field 'output': missing"]
    # a preference file whose first record lacks "rejected" is not mistaken for prompts
    pairs = [{"prompt": "p", "chosen": "c"}] + [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(3)]
    with pytest.raises(DataFormatError) as e:
        load(tmp_path, pairs)
    assert problems_of(e) == [f"{tmp_path / 'data.jsonl'}:record 1: field 'rejected': missing"]


def test_undetectable_format_asks_for_an_override(tmp_path):
    with pytest.raises(DataFormatError) as e:
        load(tmp_path, [{"text": "hello"}])
    assert "data.jsonl:record 1: cannot tell the format from fields ['text']; pass --format" in str(e.value)


def test_format_override(tmp_path):
    records = [{"conversations": [{"from": "human", "value": "q"}], "chosen": "good", "rejected": "bad"}]
    path = write(tmp_path / "pairs.jsonl", records)
    assert load_records(path)[1].format == "sharegpt_preference"
    # the same file read as ShareGPT conversations: the prompt alone, no assistant turn
    with pytest.raises(DataFormatError, match="every record was skipped"):
        load_records(path, format="sharegpt")
    with pytest.raises(DataFormatError, match="record 1: field 'prompt': missing"):  # wrong format: no crash
        load_records(path, format="prompt")
    with pytest.raises(DataFormatError, match="unknown format 'csv'"):
        load_records(path, format="csv")
    assert load_records(path, format="auto")[1].format == "sharegpt_preference"


# non-ASCII text round-trips unchanged
UNICODE_SAMPLES = ["中文：你好，世界！", "emoji 👩‍💻🎉", "עברית ومرحبا", "e\u0301 combining", "tab\tand\x00nul",
                   "line\u2028sep", "“curly” ‘quotes’ — dash", "\U0001f600 astral"]


@pytest.mark.parametrize("name", ["u.jsonl", "u.json", "u.jsonl.gz", "u.parquet"])
def test_unicode_round_trips_in_every_container(tmp_path, name):
    records = [{"instruction": t, "input": "", "output": t[::-1]} for t in UNICODE_SAMPLES]
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), tmp_path / name)
        loaded, _ = load_records(tmp_path / name)
    else:
        loaded, _ = load(tmp_path, records, name)
    for record, converted in zip(records, loaded):
        assert converted["messages"][0]["content"].encode("utf-8") == record["instruction"].encode("utf-8")
        assert converted["messages"][1]["content"].encode("utf-8") == record["output"].encode("utf-8")


def test_ascii_escaped_json_decodes_to_the_same_text(tmp_path):
    records = [{"prompt": t, "chosen": "好", "rejected": "坏"} for t in UNICODE_SAMPLES]
    path = tmp_path / "escaped.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records), encoding="ascii")
    loaded, _ = load_records(path)
    assert [r["prompt"][0]["content"] for r in loaded] == UNICODE_SAMPLES
