"""Each supported format parses into the internal schema, on small files generated in tmp_path."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rlhf.data import (
    DataFormatError,
    load_records,
)
from tests.data_helpers import HH_PAIR, assistant, load, problems_of, system, user


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


def test_prompt_columns_travel_with_the_prompt_and_stay_writable(tmp_path):
    # a lone surrogate (a JSON "\ud800" escape) in a column would break every UTF-8 writer downstream
    prompts, _ = load(tmp_path, [{"prompt": "q", "answer": "4", "level": 2, "source": "a\ud800b"}], kind="prompt")
    assert prompts == [{"prompt": [user("q")], "columns": {"answer": "4", "level": 2, "source": "a\ufffdb"}}]


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
