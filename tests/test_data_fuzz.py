"""Property tests: data the loaders have never seen, in each format, with random defects.

"Without crashing" means: ``load_records`` returns records in the internal schema, or raises
``DataFormatError`` whose every problem names the file -- never a KeyError/TypeError/AttributeError.
A second group checks that well-formed records of each format round-trip their text unchanged.
"""

from __future__ import annotations

import copy
import gzip
import html
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.data import FORMATS, DataFormatError, load_records, split_records
from rlhf.data.formats import EMPTY_OUTPUTS, PLACEHOLDER_INPUTS

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(FUZZ, max_examples=100)  # the properties that are not per format
ROLES = ("system", "user", "assistant")

# ---------------------------------------------------------------------------------------------
# strategies: realistic records of each format, then random defects on top

text = st.text(max_size=12)  # any unicode (hypothesis leaves out lone surrogates, which JSON escapes allow)
odd_text = st.one_of(text, st.sampled_from(["", "  ", "\ud800", "a\udfffb", "\x00", "\u2028", "\ufeff", "\r\n",
                                            "中文", "👩‍💻", "\n\nHuman: hi", "\n\nAssistant:", "<nooutput>", "No input"]))
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), odd_text)
junk = st.recursive(scalar, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(text, inner, max_size=2),
                    max_leaves=4)
extra_keys = st.dictionaries(st.sampled_from(["id", "source", "lang", "score", "meta", "weight", "category"]),
                             st.one_of(scalar, junk), max_size=2)
message_extras = st.sampled_from([{}, {}, {}, {"name": "x"}, {"weight": 0}, {"loss": None}, {"tool_calls": []}])

USER_ROLES = ["user", "human", "Human", "USER", "prompter"]
BOT_ROLES = ["assistant", "gpt", "chatgpt", "model", "bot", "Assistant", "GPT"]
OTHER_ROLES = ["system", "developer", "tool", "function", "observation"]
ROLE_OF = {"u": USER_ROLES, "a": BOT_ROLES, "s": ["system", "developer"], "t": ["tool", "function"]}

content = st.one_of(
    odd_text, odd_text, st.none(),
    st.lists(st.one_of(text, st.builds(lambda t, k: {"type": k, "text": t}, text,
                                       st.sampled_from(["text", "text", "input_text", "image_url"]))), max_size=2),
)


@st.composite
def message(draw, kind: str, rk: str = "role", ck: str = "content") -> dict:
    if draw(st.integers(0, 9)) == 0:  # some dumps mix the two key styles
        rk, ck = ("from", "value") if rk == "role" else ("role", "content")
    return {rk: draw(st.sampled_from(ROLE_OF[kind])), ck: draw(content), **draw(message_extras)}


ROLE_SEQUENCES = st.one_of(
    st.integers(1, 3).map(lambda n: "ua" * n),  # the usual alternation
    st.integers(1, 3).map(lambda n: "s" + "ua" * n),
    st.text("uasst", min_size=0, max_size=5),  # anything: same-role runs, trailing turns, tools
)


def conversation(rk: str = "role", ck: str = "content", ending: str | None = None):
    sequences = ROLE_SEQUENCES.map(lambda r: r + ending) if ending else ROLE_SEQUENCES
    return sequences.flatmap(lambda roles: st.tuples(*[message(k, rk, ck) for k in roles]).map(list))


def hh_transcript(roles: str) -> st.SearchStrategy:
    turn = st.one_of(text, st.sampled_from(["x\n\nHuman: y", "a\n\nAssistant: b", "Human:", " ", "", "Humans: z"]))
    names = {"u": "Human", "a": "Assistant"}
    return st.tuples(*[turn for _ in roles]).map(
        lambda ts: "".join(f"\n\n{names[r]}: {t}" for r, t in zip(roles, ts)))


@st.composite
def hh_record(draw) -> dict:
    prompt = draw(st.text("ua", max_size=5).map(lambda r: r + "u"))
    shared = draw(hh_transcript(prompt))
    ends = draw(st.sampled_from(["a", "a", "a", "au", "aa", ""]))
    return {"chosen": shared + draw(hh_transcript(ends)), "rejected": shared + draw(hh_transcript(ends)),
            **draw(extra_keys)}


def text_prompt():
    return st.one_of(odd_text, st.just("\n\nHuman: hi\n\nAssistant: yo\n\nHuman: bye\n\nAssistant:"))


@st.composite
def reply(draw, prompt, rk="role", ck="content"):
    options = [odd_text, message("a", rk, ck), st.lists(message("a", rk, ck), min_size=1, max_size=2)]
    if isinstance(prompt, list):  # UltraFeedback style: the reply repeats the prompt
        options.append(message("a", rk, ck).map(lambda m: [*prompt, m]))
    elif isinstance(prompt, str):
        options.append(message("a", rk, ck).map(lambda m: [{"role": "user", "content": prompt}, m]))
    return draw(st.one_of(options))


@st.composite
def explicit_pair(draw, prompt_strategy, rk="role", ck="content", prompt_key="prompt") -> dict:
    prompt = draw(prompt_strategy)
    return {prompt_key: prompt, "chosen": draw(reply(prompt, rk, ck)), "rejected": draw(reply(prompt, rk, ck)),
            **draw(extra_keys)}


@st.composite
def implicit_pair(draw) -> dict:
    shared = draw(conversation(ending="u"))
    tail = st.one_of(st.tuples(message("a")).map(list), conversation())
    return {"chosen": shared + draw(tail), "rejected": shared + draw(tail), **draw(extra_keys)}


alpaca_fields = st.fixed_dictionaries(
    {"instruction": odd_text, "input": st.one_of(odd_text, st.sampled_from(["", "No input", "<noinput>", "无输入"]))},
    optional={"system": odd_text, "history": st.lists(st.tuples(text, text).map(list), max_size=2)},
)

VALID = {
    "alpaca": st.builds(lambda a, o, x: {**a, "output": o, **x}, alpaca_fields,
                        st.one_of(odd_text, st.sampled_from(["", "<nooutput>"])), extra_keys),
    "messages": st.builds(lambda m, x: {"messages": m, **x}, conversation(), extra_keys),
    "sharegpt": st.builds(lambda m, k, x: {k: m, **x}, conversation("from", "value"),
                          st.sampled_from(["conversations", "conversation"]),
                          st.fixed_dictionaries({}, optional={"system": odd_text, "id": text})),
    "prompt_completion": st.builds(lambda p, c: {"prompt": p, "completion": c},
                                   st.one_of(text_prompt(), conversation(ending="u")), reply(None)),
    "prompt": st.builds(lambda p, x: {"prompt": p, **x}, st.one_of(text_prompt(), conversation()), extra_keys),
    "preference": explicit_pair(st.one_of(text_prompt(), conversation(ending="u"))),
    "implicit_preference": implicit_pair(),
    "hh": hh_record(),
    "sharegpt_preference": explicit_pair(conversation("from", "value", ending="u"), "from", "value", "conversations"),
    "alpaca_preference": st.builds(lambda a, c, r: {**a, "chosen": c, "rejected": r}, alpaca_fields, odd_text, odd_text),
}
assert set(VALID) == set(FORMATS)


@st.composite
def corrupted(draw, record: dict) -> dict:
    """``record`` with one value somewhere inside it dropped, nulled or replaced by junk."""
    record = copy.deepcopy(record)
    paths = []

    def walk(value, path):
        paths.append(path)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            walk(item, (*path, key))

    walk(record, ())
    path = draw(st.sampled_from(paths[1:])) if len(paths) > 1 else None
    if path is None:
        return record
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["drop", "null", "junk"]))
    if action == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = None if action == "null" else draw(junk)
    return record


# mostly realistic records, one in four with a defect somewhere
RECORDS = {fmt: st.one_of(valid, valid, valid, valid.flatmap(corrupted)) for fmt, valid in VALID.items()}

CONTAINERS = ["data.jsonl", "data.json", "data.jsonl.gz", "jsonl_saved_as.json", "data.json.gz"]


def write_file(directory: str, name: str, records: list) -> Path:
    path = Path(directory) / name
    if name == "data.json" or name == "data.json.gz":
        body = json.dumps(records)
    else:  # one object per line, with the odd blank line
        body = "\n\n".join(json.dumps(r) for r in records) + "\n"
    raw = body.encode("utf-8")  # ensure_ascii JSON: lone surrogates travel as escapes, like real files
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    return path


# ---------------------------------------------------------------------------------------------
# checks


def check_schema(records: list[dict], report, kind: str | None) -> None:
    assert report.records_kept == len(records) > 0
    assert report.records_kept + sum(report.skipped.values()) == report.records_read
    assert report.kind in ("sft", "preference", "prompt") and (kind is None or report.kind == kind)
    for record in records:
        json.dumps(record, ensure_ascii=False).encode("utf-8")  # writable as UTF-8 (no lone surrogates)
        columns = record.get("columns", {})  # a prompt record's extra scalar fields, for reward functions
        assert report.kind == "prompt" or not columns
        assert all(isinstance(v, str | int | float | bool) for v in columns.values())
        for name, messages in record.items():
            if name == "columns":
                continue
            assert isinstance(messages, list) and messages
            for m in messages:
                assert set(m) == {"role", "content"} and m["role"] in ROLES and isinstance(m["content"], str)
        if report.kind == "sft":
            assert set(record) == {"messages"}
            roles = [m["role"] for m in record["messages"]]
            assert roles[-1] == "assistant" and record["messages"][-1]["content"].strip()
            assert all(a != b for a, b in zip(roles, roles[1:]))  # same-role runs were merged
        elif report.kind == "preference":
            assert set(record) == {"prompt", "chosen", "rejected"}
            assert record["prompt"][-1]["role"] == "user" and record["chosen"] != record["rejected"]
            assert all(m["role"] == "assistant" for m in record["chosen"] + record["rejected"])
        else:
            assert set(record) - {"columns"} == {"prompt"} and record["prompt"][-1]["role"] == "user"


def load_or_error(path: Path, **kwargs):
    try:
        records, report = load_records(path, **kwargs)
    except DataFormatError as e:
        assert e.problems and all(p.startswith(str(path)) for p in e.problems), e.problems
        assert str(e).split(" ", 1)[1].startswith("problem(s) in the input:\n  " + e.problems[0])
        return None
    check_schema(records, report, kwargs.get("kind"))
    return records, report


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield d


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_each_format_parses_or_raises_data_format_error(workdir, fmt):
    @FUZZ
    @given(records=st.lists(RECORDS[fmt], min_size=1, max_size=3),
           container=st.sampled_from(CONTAINERS),
           override=st.sampled_from([None, "auto", fmt, fmt, *FORMATS]),
           kind=st.sampled_from([None, None, "sft", "preference", "prompt"]))
    def run(records, container, override, kind):
        path = write_file(workdir, container, records)
        load_or_error(path, format=override, kind=kind)

    run()


@FUZZ
@given(records=st.lists(st.one_of(junk, *RECORDS.values()), min_size=1, max_size=4),
       container=st.sampled_from(CONTAINERS))
def test_fuzz_mixed_formats_and_junk_records(workdir, records, container):
    load_or_error(write_file(workdir, container, records))


@QUICK
@given(raw=st.one_of(st.binary(max_size=200),
                     st.text(max_size=200).map(lambda t: t.encode("utf-8")),
                     st.lists(junk, max_size=3).map(lambda rs: "\n".join(map(json.dumps, rs)).encode())),
       name=st.sampled_from(["f.jsonl", "f.json", "f.jsonl.gz", "f.parquet", "f.txt"]))
def test_fuzz_arbitrary_bytes(workdir, raw, name):
    path = Path(workdir) / name
    path.write_bytes(raw)
    load_or_error(path)


# ---------------------------------------------------------------------------------------------
# well-formed records round-trip their text


def _is_placeholder(t: str) -> bool:  # the documented placeholder policy applies to these, not round-tripping
    return html.unescape(t.strip().lower()).strip() in PLACEHOLDER_INPUTS | EMPTY_OUTPUTS


words = st.text(min_size=1, max_size=30).filter(lambda t: t.strip() and not _is_placeholder(t))


@QUICK
@given(turns=st.lists(st.tuples(words, words), min_size=1, max_size=4), use_sharegpt=st.booleans(),
       container=st.sampled_from(CONTAINERS))
def test_valid_conversations_round_trip(workdir, turns, use_sharegpt, container):
    names = (("human", "gpt"), ("from", "value")) if use_sharegpt else (("user", "assistant"), ("role", "content"))
    (u, a), (rk, ck) = names
    raw = [m for q, ans in turns for m in ({rk: u, ck: q}, {rk: a, ck: ans})]
    record = {"conversations": raw} if use_sharegpt else {"messages": raw}
    records, report = load_records(write_file(workdir, container, [record]))
    assert report.records_kept == 1 and not report.repaired
    expected = [m for q, ans in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": ans})]
    assert records == [{"messages": expected}]


@QUICK
@given(instruction=words, inp=st.one_of(st.just(""), words), output=words)
def test_valid_alpaca_round_trips(workdir, instruction, inp, output):
    records, _ = load_records(write_file(workdir, "data.json", [{"instruction": instruction, "input": inp,
                                                                "output": output}]))
    user_text = instruction + ("\n\n" + inp if inp else "")
    assert records == [{"messages": [{"role": "user", "content": user_text},
                                     {"role": "assistant", "content": output}]}]


hh_words = words.filter(lambda t: "\n\nHuman:" not in t and "\n\nAssistant:" not in t
                        and not t.startswith(("Human:", "Assistant:")) and not t.startswith(" "))


@QUICK
@given(turns=st.lists(st.tuples(hh_words, hh_words), min_size=1, max_size=4), good=hh_words, bad=hh_words)
def test_valid_hh_round_trips(workdir, turns, good, bad):
    prefix = "".join(f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a in turns[:-1]) + f"\n\nHuman: {turns[-1][0]}"
    record = {"chosen": f"{prefix}\n\nAssistant: {good}", "rejected": f"{prefix}\n\nAssistant: {bad}"}
    path = write_file(workdir, "data.jsonl", [record])
    if good == bad:
        with pytest.raises(DataFormatError, match="identical_pair"):
            load_records(path)
        return
    (pair,), _ = load_records(path)
    expected_prompt = [m for q, a in turns[:-1] for m in ({"role": "user", "content": q},
                                                           {"role": "assistant", "content": a})]
    assert pair == {"prompt": expected_prompt + [{"role": "user", "content": turns[-1][0]}],
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}]}



@QUICK
@given(prompt_ids=st.lists(st.integers(0, 20), max_size=40), fraction=st.floats(0, 0.99), seed=st.integers(0, 3),
       rng=st.randoms(use_true_random=False))
def test_split_properties(prompt_ids, fraction, seed, rng):
    records = [{"messages": [{"role": "user", "content": f"p{p}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i, p in enumerate(prompt_ids)]
    train, held = split_records(records, fraction, seed)
    answers = lambda rs: sorted(r["messages"][1]["content"] for r in rs)  # noqa: E731
    assert answers(train + held) == answers(records)  # a partition
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in held}
    if fraction > 0 and len(set(prompt_ids)) > 1:
        assert train and held
    shuffled = list(records)
    rng.shuffle(shuffled)
    train2, held2 = split_records(shuffled, fraction, seed)
    assert answers(train2) == answers(train) and answers(held2) == answers(held)
