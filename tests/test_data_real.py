"""Every file in ../shared/data: exact counts read/kept/skipped per reason, computed here with plain json
(independently of the loader), and text that round-trips byte for byte.

CI runs in a fresh clone with ``shared/`` beside it; these tests skip (with the reason) only when it is absent.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from rlhf.data import load_records, split_records, turn_stats

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data directory {SHARED_DATA} is absent")
pytestmark = needs_shared

HH_FILES = ["hh-rlhf/helpful-online-test.jsonl.gz", "hh-rlhf/helpful-rejection-sampled-test.jsonl.gz"]
ALPACA_FILES = ["alpaca/alpaca_first2k.json", "zh/alpaca_zh_first1k.json"]
DPO_ZH = "zh/dpo_zh_500.jsonl"
ALL_FILES = HH_FILES + ALPACA_FILES + [DPO_ZH]

# The placeholders actually found in these files (by reading them), written out independently of the loader.
ALPACA_EMPTY_OUTPUTS = {"", "<No output>", "No output required", "&lt;无输出&gt;"}
ALPACA_PLACEHOLDER_INPUTS = {"Noinput", "No input.", "<no input>", "No input required", "无输入"}


def raw_records(name: str) -> list[dict]:
    path = SHARED_DATA / name
    if name.endswith(".gz"):
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    if name.endswith(".json"):
        return json.loads(text)
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def provenance_counts() -> dict[str, int]:
    """The ``records`` column of the table in PROVENANCE.md."""
    counts = {}
    for line in (SHARED_DATA / "PROVENANCE.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"[\d,]+", cells[1]) and (SHARED_DATA / cells[0]).is_file():
            counts[cells[0]] = int(cells[1].replace(",", ""))
    return counts


@pytest.fixture(scope="module")
def loaded():
    return {name: load_records(SHARED_DATA / name) for name in ALL_FILES}


def test_every_data_file_is_covered():
    on_disk = {str(p.relative_to(SHARED_DATA)) for p in SHARED_DATA.rglob("*") if p.is_file() and p.suffix != ".md"}
    assert on_disk == set(ALL_FILES)
    assert provenance_counts().keys() == set(ALL_FILES)


@pytest.mark.parametrize("name", ALL_FILES)
def test_records_read_match_provenance_and_plain_json(loaded, name):
    _, report = loaded[name]
    assert report.records_read == len(raw_records(name)) == provenance_counts()[name]
    assert report.records_kept + sum(report.skipped.values()) == report.records_read


# ---------------------------------------------------------------------------------------------
# HH-RLHF


def hh_split(transcript: str) -> tuple[str, str]:
    """(everything before the last "\\n\\nAssistant:", the final reply): the naive reading of PROVENANCE."""
    cut = transcript.rfind("\n\nAssistant:")
    return transcript[:cut], transcript[cut + len("\n\nAssistant:"):]


def ends_on_human(transcript: str) -> bool:
    return transcript.rfind("\n\nHuman:") > transcript.rfind("\n\nAssistant:")


def has_same_role_run(transcript: str) -> bool:
    roles = re.findall(r"(?:^|\n\n)(Human|Assistant):", transcript)
    return any(a == b for a, b in zip(roles, roles[1:]))


@pytest.mark.parametrize("name", HH_FILES)
def test_hh_counts(loaded, name):
    raw = raw_records(name)
    no_final = [r for r in raw if ends_on_human(r["chosen"]) or ends_on_human(r["rejected"])]
    identical = [r for r in raw if r not in no_final and r["chosen"] == r["rejected"]]
    candidates = [r for r in raw if r not in no_final and r not in identical]
    kept_pairs = {(r["chosen"], r["rejected"]) for r in candidates}
    duplicates = len(candidates) - len(kept_pairs)
    repaired = sum(has_same_role_run(r["chosen"]) or has_same_role_run(r["rejected"]) for r in candidates)
    empty_chosen = sum(not hh_split(c)[1].strip() for c, _ in kept_pairs)
    empty_rejected = sum(not hh_split(r)[1].strip() for _, r in kept_pairs)

    pairs, report = loaded[name]
    assert report.format == "hh" and report.kind == "preference"
    assert report.records_kept == len(pairs) == len(kept_pairs)
    expected_skips = {"no_final_response": len(no_final), "identical_pair": len(identical), "duplicate": duplicates}
    assert report.skipped == Counter({k: v for k, v in expected_skips.items() if v})
    assert report.repaired == Counter({"merged_same_role_turns": repaired} if repaired else {})
    expected_notes = {"empty_chosen": empty_chosen, "empty_rejected": empty_rejected,
                      "long_text": sum(any(len(m["content"]) > 2000 for m in p["prompt"] + p["chosen"] + p["rejected"])
                                       for p in pairs)}
    assert report.noted == Counter({k: v for k, v in expected_notes.items() if v})


def test_hh_known_defects_as_documented(loaded):
    """The numbers PROVENANCE.md and a plain reading give for the two HH files."""
    online, sampled = (loaded[name][1] for name in HH_FILES)
    assert sampled.skipped["identical_pair"] == 32  # "32 in helpful-rejection-sampled"
    assert online.skipped == Counter(identical_pair=2, no_final_response=2)
    assert online.noted["empty_rejected"] == 3
    # three transcripts whose turn text contains "\n\nAssistant:" (or "Humans:" then an Assistant turn):
    # a naive split on the last marker makes their prompts differ; the repair makes them agree, no skip
    raw = raw_records(HH_FILES[1])
    naive_mismatch = [i for i, r in enumerate(raw, 1) if hh_split(r["chosen"])[0] != hh_split(r["rejected"])[0]]
    assert naive_mismatch == [720, 1598, 2365]
    assert sampled.repaired == Counter(merged_same_role_turns=3) and "prompt_mismatch" not in sampled.skipped


@pytest.mark.parametrize("name", HH_FILES)
def test_hh_pairs_render_back_to_the_exact_transcripts(loaded, name):
    """prompt + reply, written back with the HH markers, gives the original transcripts byte for byte."""
    def render(messages):
        return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)

    originals = {(r["chosen"], r["rejected"]) for r in raw_records(name)}
    pairs, _ = loaded[name]
    for pair in pairs:
        assert pair["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in pair["prompt"]] == ["user", "assistant"] * (len(pair["prompt"]) // 2) + ["user"]
        assert (render(pair["prompt"] + pair["chosen"]), render(pair["prompt"] + pair["rejected"])) in originals


def test_hh_turn_statistics(loaded):
    pairs, _ = loaded[HH_FILES[1]]
    stats = turn_stats(pairs)
    longest = max(raw_records(HH_FILES[1]), key=lambda r: len(re.findall(r"\n\n(?:Human|Assistant):", r["chosen"])))
    assert stats["turns_max"] == len(re.findall(r"\n\n(?:Human|Assistant):", longest["chosen"]))
    assert stats["messages_by_role"]["user"] == stats["messages_by_role"]["assistant"]
    assert 0 < stats["multi_turn_records"] < len(pairs)


# ---------------------------------------------------------------------------------------------
# Alpaca (English and Chinese)


@pytest.mark.parametrize("name", ALPACA_FILES)
def test_alpaca_counts(loaded, name):
    raw = raw_records(name)
    assert all(set(r) == {"instruction", "input", "output"} for r in raw)
    kept_raw = [r for r in raw if r["output"].strip() not in ALPACA_EMPTY_OUTPUTS]
    empty = len(raw) - len(kept_raw)
    placeholder = sum(r["input"].strip() in ALPACA_PLACEHOLDER_INPUTS for r in kept_raw)

    def user_text(r):
        real_input = "" if r["input"].strip() in ALPACA_PLACEHOLDER_INPUTS else r["input"]
        return r["instruction"] + ("\n\n" + real_input if real_input.strip() else "")

    distinct = list(dict.fromkeys((user_text(r), r["output"]) for r in kept_raw))
    records, report = loaded[name]
    assert report.format == "alpaca" and report.kind == "sft"
    assert report.skipped == Counter({"empty_response": empty, **({"duplicate": len(kept_raw) - len(distinct)}
                                                                     if len(distinct) < len(kept_raw) else {})})
    assert report.repaired == Counter(placeholder_input=placeholder)
    assert report.records_kept == len(distinct)
    # and the text itself is exactly the file's, in order
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in records] == distinct
    long_records = sum(any(len(t) > 2000 for t in pair) for pair in distinct)
    assert report.noted == Counter({"long_text": long_records} if long_records else {})


def test_alpaca_known_defects_as_documented(loaded):
    en, zh = (loaded[name][1] for name in ALPACA_FILES)
    assert (en.records_read, en.records_kept, en.skipped["empty_response"], en.repaired["placeholder_input"]) == \
        (2000, 1993, 7, 25)
    assert en.noted["long_text"] == 4  # "some are over 2,000 characters"
    assert (zh.records_read, zh.records_kept, zh.skipped["empty_response"], zh.repaired["placeholder_input"]) == \
        (1000, 998, 2, 9)


# ---------------------------------------------------------------------------------------------
# dpo_zh_500 and Chinese round trips


def test_dpo_zh_counts_and_exact_text(loaded):
    raw = raw_records(DPO_ZH)
    pairs, report = loaded[DPO_ZH]
    assert report.format == "sharegpt_preference" and report.kind == "preference"
    assert report.records_read == report.records_kept == 500 and not report.skipped and not report.repaired
    with_system = sum(r["conversations"][0]["from"] == "system" for r in raw)
    assert turn_stats(pairs)["messages_by_role"] == {"system": with_system, "user": 500, "assistant": 500}
    role = {"system": "system", "human": "user"}
    for r, pair in zip(raw, pairs):
        assert pair["prompt"] == [{"role": role[m["from"]], "content": m["value"]} for m in r["conversations"]]
        assert pair["chosen"] == [{"role": "assistant", "content": r["chosen"]}]
        assert pair["rejected"] == [{"role": "assistant", "content": r["rejected"]}]
    long_records = sum(any(len(m["content"]) > 2000 for m in p["prompt"] + p["chosen"] + p["rejected"]) for p in pairs)
    assert report.noted == Counter(long_text=long_records)


def expected_texts(name: str) -> list[list[str]]:
    """The texts each kept record must hold, straight from plain json, in record order."""
    out = []
    for r in raw_records(name):
        if name == DPO_ZH:
            out.append([m["value"] for m in r["conversations"]] + [r["chosen"], r["rejected"]])
        elif r["output"].strip() not in ALPACA_EMPTY_OUTPUTS:
            real_input = "" if r["input"].strip() in ALPACA_PLACEHOLDER_INPUTS else r["input"]
            out.append([r["instruction"] + ("\n\n" + real_input if real_input else ""), r["output"]])
    return out


@pytest.mark.parametrize("name", [DPO_ZH, "zh/alpaca_zh_first1k.json"])
def test_chinese_text_round_trips_byte_identical(loaded, name, tmp_path):
    """The UTF-8 bytes of every kept text equal the file's; the records survive a write/read cycle."""
    records, _ = loaded[name]
    texts = [[m["content"] for key in ("messages", "prompt", "chosen", "rejected") for m in r.get(key, [])]
             for r in records]
    expected = expected_texts(name)
    assert len(texts) == len(expected)
    for got, want in zip(texts, expected):
        assert [t.encode("utf-8") for t in got] == [t.encode("utf-8") for t in want]
    assert sum(bool(re.search("[\u4e00-\u9fff]", t)) for r in texts for t in r) > len(records)
    out = tmp_path / "roundtrip.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    again, report = load_records(out)
    assert again == records and report.records_kept == len(records)


# ---------------------------------------------------------------------------------------------
# splits and the prompt view on real data


@pytest.mark.parametrize("name", [HH_FILES[0], ALPACA_FILES[0]])
def test_split_on_real_data(loaded, name):
    records, _ = loaded[name]
    train, held = split_records(records, 0.1, seed=3)
    assert len(train) + len(held) == len(records)
    assert 0.05 < len(held) / len(records) < 0.15
    key = lambda r: json.dumps(r.get("prompt") or r["messages"][:-1], ensure_ascii=False)  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert split_records(list(reversed(records)), 0.1, seed=3)[1] == list(reversed(held))


def test_real_files_reduce_to_prompts():
    for name in ALL_FILES:
        prompts, report = load_records(SHARED_DATA / name, kind="prompt")
        assert report.kind == "prompt" and prompts
        assert all(p["prompt"][-1]["role"] == "user" and set(p) == {"prompt"} for p in prompts)
