"""Each supported format, each container, and each defect class, on small files generated in tmp_path.

Errors must name the file, the record number and the field; documented policies must be counted.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from rlhf.data import (
    FORMATS,
    POLICIES,
    DataFormatError,
    LoadReport,
    detect_format,
    load_records,
    prompt_of,
    split_records,
    turn_stats,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def write(path: Path, records, container: str = "jsonl") -> Path:
    """Write records as jsonl (one per line) or json (a list); non-ASCII raw, unless it is a lone surrogate."""
    ascii_only = any("\ud800" <= c <= "\udfff" for c in json.dumps(records, ensure_ascii=False))
    if container == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records)
    elif container == "json":
        text = json.dumps(records, ensure_ascii=ascii_only, indent=2)
    else:
        raise ValueError(container)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, records, name: str = "data.jsonl", container: str | None = None, **kwargs):
    container = container or ("json" if name.endswith((".json", ".json.gz")) else "jsonl")
    return load_records(write(tmp_path / name, records, container), **kwargs)


def problems_of(excinfo) -> list[str]:
    return excinfo.value.problems


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


HH_PAIR = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: A chair.",
}


# ---------------------------------------------------------------------------------------------
# each format parses into the internal schema


def test_alpaca_json_list_and_jsonl_give_the_same_records(tmp_path):
    records = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]
    as_list, report = load(tmp_path, records, "a.json")
    as_lines, _ = load(tmp_path, records, "a.jsonl")
    assert as_list == as_lines
    assert report.format == "alpaca" and report.kind == "sft" and report.records_kept == 2
    assert as_list[0]["messages"] == [user("Translate to French.\n\nGood morning"), assistant("Bonjour")]
    assert as_list[1]["messages"] == [user("Name a colour."), assistant("Blue.")]


def test_alpaca_system_and_history_become_turns(tmp_path):
    record = {
        "instruction": "And in German?", "input": "", "output": "Guten Morgen", "system": "Be brief.",
        "history": [["Say good morning in French.", "Bonjour"]], "category": "translation", "id": 7,
    }
    (converted,), _ = load(tmp_path, [record])
    assert converted["messages"] == [
        system("Be brief."), user("Say good morning in French."), assistant("Bonjour"),
        user("And in German?"), assistant("Guten Morgen"),
    ]


def test_alpaca_text_is_not_stripped(tmp_path):
    record = {"instruction": "  Indented instruction\n", "input": "", "output": "\n  reply with spaces  \n"}
    (converted,), _ = load(tmp_path, [record])
    assert converted["messages"] == [user(record["instruction"]), assistant(record["output"])]


def test_openai_messages_with_text_parts_and_developer_role(tmp_path):
    record = {"messages": [
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi."}], "refusal": None},
    ], "metadata": {"source": "x"}}
    (converted,), report = load(tmp_path, [record])
    assert report.format == "messages"
    assert converted["messages"] == [system("You are terse."), user("Hello world"), assistant("Hi.")]


def test_openai_image_part_is_a_field_error(tmp_path):
    record = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]},
        {"role": "assistant", "content": "A cat."},
    ]}
    with pytest.raises(DataFormatError) as e:
        load(tmp_path, [record])
    assert "data.jsonl:record 1: field 'messages[0].content'" in problems_of(e)[0]


@pytest.mark.parametrize("user_role, bot_role", [("human", "gpt"), ("user", "assistant"), ("Human", "ChatGPT"),
                                                  ("user", "chatgpt"), ("human", "model")])
def test_sharegpt_role_names(tmp_path, user_role, bot_role):
    record = {"conversations": [
        {"from": "system", "value": "sys"}, {"from": user_role, "value": "q1"}, {"from": bot_role, "value": "a1"},
        {"from": user_role, "value": "q2"}, {"from": bot_role, "value": "a2"},
    ], "id": "abc"}
    (converted,), report = load(tmp_path, [record])
    assert report.format == "sharegpt"
    assert converted["messages"] == [system("sys"), user("q1"), assistant("a1"), user("q2"), assistant("a2")]


def test_sharegpt_top_level_system_and_singular_key(tmp_path):
    record = {"conversation": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "S"}
    (converted,), _ = load(tmp_path, [record])
    assert converted["messages"] == [system("S"), user("q"), assistant("a")]


def test_hh_prompt_is_the_shared_text_up_to_the_last_assistant_turn(tmp_path):
    (pair,), report = load(tmp_path, [HH_PAIR])
    assert report.format == "hh" and report.kind == "preference"
    assert pair == {
        "prompt": [user("Hi there"), assistant("Hello! How can I help?"), user("Name a fruit.")],
        "chosen": [assistant("An apple.")],
        "rejected": [assistant("A chair.")],
    }


def test_hh_spurious_markers_inside_a_turn_are_kept_as_text(tmp_path):
    reply = "Here is a recipe:\n\nAssistant:  Ingredients: salt"
    record = {"chosen": f"\n\nHuman: Ham?\n\nAssistant: {reply}", "rejected": "\n\nHuman: Ham?\n\nAssistant: No."}
    (pair,), report = load(tmp_path, [record])
    assert pair["chosen"] == [assistant(reply)]
    assert report.repaired == Counter({"merged_same_role_turns": 1})


def test_hh_inline_human_without_blank_line_is_turn_text(tmp_path):
    reply = "Sure.  Human: thanks"
    record = {"chosen": f"\n\nHuman: Q\n\nAssistant: {reply}", "rejected": "\n\nHuman: Q\n\nAssistant: No."}
    (pair,), report = load(tmp_path, [record])
    assert pair["chosen"] == [assistant(reply)] and not report.repaired


def test_hh_skips_and_notes(tmp_path):
    records = [
        HH_PAIR,
        {"chosen": HH_PAIR["chosen"], "rejected": HH_PAIR["chosen"]},  # identical
        {"chosen": HH_PAIR["chosen"], "rejected": "\n\nHuman: Hi there\n\nAssistant: Yo\n\nHuman: More?"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},  # prompt differs
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: A\n\nAssistant:"},  # empty rejected
        {"chosen": "\n\nHuman: C\n\nAssistant: ", "rejected": "\n\nHuman: C\n\nAssistant: y"},  # empty chosen
        {"chosen": "\n\nAssistant: x", "rejected": "\n\nAssistant: y"},  # no user turn at all
        {"chosen": "\n\nHuman:  \n\nAssistant: x", "rejected": "\n\nHuman:  \n\nAssistant: y"},  # blank user
    ]
    pairs, report = load(tmp_path, records)
    assert report.records_read == 8 and report.records_kept == 3 == len(pairs)
    assert report.skipped == Counter(identical_pair=1, no_final_response=1, prompt_mismatch=1,
                                     prompt_not_ending_on_user=1, empty_prompt=1)
    assert report.noted == Counter(empty_rejected=1, empty_chosen=1)
    assert pairs[1]["rejected"] == [assistant("")]


def test_hh_text_before_the_first_marker_is_an_error(tmp_path):
    with pytest.raises(DataFormatError) as e:
        load(tmp_path, [HH_PAIR, {"chosen": "preamble\n\nHuman: a\n\nAssistant: b", "rejected": HH_PAIR["rejected"]}])
    assert problems_of(e) == [
        f"{tmp_path / 'data.jsonl'}:record 2: field 'chosen': text before the first role marker: 'preamble'"
    ]


def test_explicit_preference_strings_and_messages(tmp_path):
    records = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [system("math"), user("3+3?")], "chosen": [assistant("6")], "rejected": [assistant("7")]},
        {"prompt": [user("1+1?")], "chosen": {"role": "assistant", "content": "2"},
         "rejected": {"role": "assistant", "content": "3"}, "score_chosen": 9.0},
    ]
    pairs, report = load(tmp_path, records)
    assert report.format == "preference"
    assert pairs[0] == {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    assert pairs[1]["prompt"] == [system("math"), user("3+3?")]
    assert pairs[2]["chosen"] == [assistant("2")] and pairs[2]["rejected"] == [assistant("3")]


def test_ultrafeedback_style_replies_repeating_the_prompt_are_stripped(tmp_path):
    record = {
        "prompt": "Why is the sky blue?", "prompt_id": "p1", "score_chosen": 8.0, "score_rejected": 3.0,
        "chosen": [user("Why is the sky blue?"), assistant("Rayleigh scattering.")],
        "rejected": [user("Why is the sky blue?"), assistant("Because it is.")],
        "messages": [user("Why is the sky blue?"), assistant("Rayleigh scattering.")],
    }
    (pair,), report = load(tmp_path, [record])
    assert pair == {"prompt": [user("Why is the sky blue?")], "chosen": [assistant("Rayleigh scattering.")],
                    "rejected": [assistant("Because it is.")]}
    assert report.repaired == Counter(prompt_prefix_stripped=1)


def test_reply_repeating_a_different_prompt_is_an_error(tmp_path):
    record = {"prompt": "Q", "chosen": [user("other"), assistant("a")], "rejected": "b"}
    with pytest.raises(DataFormatError) as e:
        load(tmp_path, [record])
    assert "data.jsonl:record 1: field 'chosen'" in problems_of(e)[0]


def test_dahoas_style_transcript_prompt(tmp_path):
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye?\n\nAssistant:"
    records = [{"prompt": prompt, "response": " Bye!", "chosen": " Bye!", "rejected": " No."},
               {"prompt": prompt, "chosen": prompt + " See you", "rejected": " Go."}]
    pairs, report = load(tmp_path, records)
    assert pairs[0]["prompt"] == [user("Hi"), assistant("Hello"), user("Bye?")]
    assert pairs[0]["chosen"] == [assistant(" Bye!")]
    assert pairs[1]["chosen"] == [assistant(" See you")]
    assert report.repaired == Counter(prompt_prefix_stripped=1)


def test_implicit_preference_shared_prefix(tmp_path):
    records = [
        {"chosen": [user("q1"), assistant("a1"), user("q2"), assistant("good")],
         "rejected": [user("q1"), assistant("a1"), user("q2"), assistant("bad")]},
        {"chosen": [user("q"), assistant("x")], "rejected": [user("other"), assistant("y")]},  # no shared prompt
        {"chosen": [user("q"), assistant("x"), user("q2"), assistant("z")],
         "rejected": [user("q"), assistant("y"), user("q2"), assistant("w")]},  # differ before the last turn
        {"chosen": [user("q"), assistant("x")], "rejected": [user("q")]},  # rejected has no reply
    ]
    pairs, report = load(tmp_path, records)
    assert report.format == "implicit_preference"
    assert pairs == [{"prompt": [user("q1"), assistant("a1"), user("q2")],
                      "chosen": [assistant("good")], "rejected": [assistant("bad")]}]
    assert report.skipped == Counter(prompt_mismatch=2, no_final_response=1)


def test_dpo_zh_style_and_llama_factory_message_dicts(tmp_path):
    records = [
        {"conversations": [{"from": "system", "value": "你是医生"}, {"from": "human", "value": "头疼怎么办？"}],
         "chosen": "多喝水，休息。", "rejected": "不知道。"},
        {"conversations": [{"from": "human", "value": "你好"}], "system": "系统",
         "chosen": {"from": "gpt", "value": "你好！"}, "rejected": {"from": "gpt", "value": "走开"}},
    ]
    pairs, report = load(tmp_path, records)
    assert report.format == "sharegpt_preference"
    assert pairs[0] == {"prompt": [system("你是医生"), user("头疼怎么办？")],
                        "chosen": [assistant("多喝水，休息。")], "rejected": [assistant("不知道。")]}
    assert pairs[1]["prompt"] == [system("系统"), user("你好")] and pairs[1]["chosen"] == [assistant("你好！")]


def test_alpaca_preference(tmp_path):
    record = {"instruction": "Pick one", "input": "N/A", "chosen": "A", "rejected": "B"}
    (pair,), report = load(tmp_path, [record])
    assert report.format == "alpaca_preference"
    assert pair == {"prompt": [user("Pick one")], "chosen": [assistant("A")], "rejected": [assistant("B")]}
    assert report.repaired == Counter(placeholder_input=1)


def test_prompt_only_and_prompt_completion(tmp_path):
    prompts, report = load(tmp_path, [{"prompt": "Tell a joke"}, {"prompt": [system("s"), user("Hi")]}], "p.jsonl")
    assert report.format == "prompt" and report.kind == "prompt"
    assert prompts == [{"prompt": [user("Tell a joke")]}, {"prompt": [system("s"), user("Hi")]}]
    sft, report = load(tmp_path, [{"prompt": "Hi", "completion": "Hello"},
                                  {"prompt": [user("Yo")], "completion": [assistant("Hey")]}], "pc.jsonl")
    assert report.format == "prompt_completion" and report.kind == "sft"
    assert sft == [{"messages": [user("Hi"), assistant("Hello")]}, {"messages": [user("Yo"), assistant("Hey")]}]


def test_prompt_only_edge_cases_are_skipped_not_crashes(tmp_path):
    records = [{"prompt": "ok"}, {"prompt": []}, {"prompt": [user("q"), assistant("a")]}, {"prompt": "   "}]
    prompts, report = load(tmp_path, records)
    assert prompts == [{"prompt": [user("ok")]}]
    assert report.skipped == Counter(prompt_not_ending_on_user=2, empty_prompt=1)


def test_common_dataset_layouts(tmp_path):
    # ultrachat_200k: a "prompt" column beside the whole conversation
    ultrachat = {"prompt": "Hi", "prompt_id": "0a", "messages": [user("Hi"), assistant("Hello"), user("Bye"),
                                                                  assistant("Ciao")]}
    (sft,), report = load(tmp_path, [ultrachat], "ultrachat.jsonl")
    assert report.format == "messages" and sft["messages"] == ultrachat["messages"]
    # Dolly: instruction / context / response
    dolly = {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"}
    (sft,), report = load(tmp_path, [dolly], "dolly.jsonl")
    assert report.format == "alpaca"
    assert sft["messages"] == [user("Summarise.\n\nA long text."), assistant("Short.")]
    # prompt / response
    (sft,), report = load(tmp_path, [{"prompt": "Q?", "response": "A."}], "pr.jsonl")
    assert report.format == "prompt_completion" and sft["messages"] == [user("Q?"), assistant("A.")]
    # a JSON document holding several splits
    splits = {"train": [{"prompt": "train prompt"}], "test": [{"prompt": "test prompt"}]}
    (tmp_path / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    assert load_records(tmp_path / "splits.json")[0] == [{"prompt": [user("train prompt")]}]
    assert load_records(tmp_path / "splits.json", split="test")[0] == [{"prompt": [user("test prompt")]}]


def test_kind_prompt_reduces_any_format_to_prompts(tmp_path):
    records = [{"messages": [user("q"), assistant("a"), user("q2"), assistant("a2")]},
               {"messages": [assistant("greeting"), user("hi"), assistant("hello")]}]
    prompts, report = load(tmp_path, records, kind="prompt")
    assert report.kind == "prompt"
    assert prompts == [{"prompt": [user("q"), assistant("a"), user("q2")]},
                       {"prompt": [assistant("greeting"), user("hi")]}]
    pairs, _ = load(tmp_path, [HH_PAIR], "hh.jsonl", kind="prompt")
    assert pairs == [{"prompt": [user("Hi there"), assistant("Hello! How can I help?"), user("Name a fruit.")]}]


@pytest.mark.parametrize("records, kind", [([{"messages": [user("q"), assistant("a")]}], "preference"),
                                           ([{"prompt": "q"}], "sft")])
def test_kind_mismatch_is_a_clear_error(tmp_path, records, kind):
    with pytest.raises(DataFormatError, match=f"this stage needs {kind} data"):
        load(tmp_path, records, kind=kind)


def test_preference_data_serves_sft_as_prompt_plus_chosen(tmp_path):
    conversations, report = load(tmp_path, [HH_PAIR], "hh.jsonl", kind="sft")
    assert report.kind == "sft"
    pair, _ = load(tmp_path, [HH_PAIR], "hh2.jsonl", kind="preference")
    assert conversations == [{"messages": pair[0]["prompt"] + pair[0]["chosen"]}]


def test_a_reply_of_several_assistant_messages_is_one_turn(tmp_path):
    # found by the fuzz: prompt + chosen for SFT had two assistant turns in a row
    record = {"prompt": [user("hi")], "chosen": [assistant("Sorry."), assistant("Refund sent.")],
              "rejected": "No."}
    (pair,), report = load(tmp_path, [record], kind="preference")
    assert pair["chosen"] == [assistant("Sorry.\n\nRefund sent.")]
    assert report.repaired["merged_same_role_turns"] == 1
    (conversation,), _ = load(tmp_path, [record], "sft.jsonl", kind="sft")
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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
