"""Load a file or Hub dataset of any supported format into the internal schema, with a report.

``load_records`` is the one entry point: read -> detect format -> convert each record (errors
collected with ``file:record: field``) -> exact de-duplication -> counts. ``split_records`` makes a
deterministic train/eval split keyed on the prompt, so one prompt never lands in both halves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter

from .formats import CONVERTERS, FORMATS, FieldError, detect_format
from .readers import MAX_PROBLEMS_SHOWN, read_records
from .schema import DataFormatError, LoadReport, SkipRecord, validate_conversation, where

# the fields formats read; a prompt record's other scalar fields travel with it as ``columns`` (a reward
# function's extra arguments: a reference answer for a verifier, a category for a rule)
FORMAT_FIELDS = frozenset({"prompt", "completion", "response", "chosen", "rejected", "messages", "conversations",
                           "conversation", "instruction", "input", "context", "output", "system", "history", "id"})


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _columns(record: dict) -> dict:
    columns = {k: v for k, v in record.items() if k not in FORMAT_FIELDS and isinstance(v, str | int | float | bool)}
    # a JSON "\ud800" escape in a column cannot be written as UTF-8 (logs, W&B tables): U+FFFD stands in for it
    return {k: _LONE_SURROGATE.sub("\ufffd", v) if isinstance(v, str) else v for k, v in columns.items()}


def load_records(
    path: str | os.PathLike,
    format: str | None = None,
    kind: str | None = None,
    split: str = "train",
    max_records: int | None = None,
    dedup: bool = True,
) -> tuple[list[dict], LoadReport]:
    """Records of ``path`` in the internal schema and the report of what was kept, skipped and repaired.

    ``format`` overrides detection (one of ``FORMATS``); ``kind`` ("sft", "preference" or "prompt")
    checks that the data suits the stage that asked for it ("prompt": any format, reduced to prompts; a
    prompt record keeps the raw record's other scalar fields as ``columns``). Repairs and notes are
    counted per kept record (a record merged twice counts once).
    """
    path = os.fspath(path)
    if format not in (None, "auto") and format not in CONVERTERS:
        raise DataFormatError([f"{path}: unknown format {format!r}; choose one of {', '.join(FORMATS)}"])
    raw = read_records(path, split=split, max_records=max_records)
    fmt = format if format not in (None, "auto") else _detect(path, raw)
    record_kind, convert = CONVERTERS[fmt]
    if kind == "prompt" and record_kind != "prompt":
        convert, record_kind = _prompts_from(convert), "prompt"
    if kind == "sft" and record_kind == "preference":  # SFT on the preferred replies (InstructGPT-style)
        convert, record_kind = _chosen_conversations_from(convert), "sft"
    if kind and kind != record_kind:
        raise DataFormatError(
            [f"{path}: format {fmt!r} holds {record_kind} data, but this stage needs {kind} data"]
        )
    report = LoadReport(source=path, format=fmt, kind=record_kind, records_read=len(raw))
    out, problems, seen = [], [], set()
    for number, record in raw:
        scratch = LoadReport(source=path)  # this record's repairs/notes, counted only if it is kept
        try:
            converted = convert(record, scratch)
        except SkipRecord as skip:
            report.skipped[skip.reason] += 1
            continue
        except FieldError as e:
            problems.append(f"{where(path, number, e.field_name)}: {e}")
            continue
        if record_kind == "prompt" and _columns(record):
            converted["columns"] = _columns(record)
        invalid = validate_converted(converted, where(path, number))
        if invalid:
            problems += invalid
            continue
        if dedup:
            key = _fingerprint(converted)
            if key in seen:
                report.skipped["duplicate"] += 1
                continue
            seen.add(key)
        report.repaired.update(set(scratch.repaired))
        report.noted.update(set(scratch.noted))
        out.append(converted)
    if problems:
        raise DataFormatError(problems[:MAX_PROBLEMS_SHOWN], len(problems))
    report.records_kept = len(out)
    if not out:
        raise DataFormatError([f"{path}: every record was skipped ({dict(report.skipped)}); nothing to train on"])
    return out, report


DETECT_SAMPLE = 100


def _detect(path: str, raw: list[tuple[int, dict]]) -> str:
    """The most common format among the first records: one defective first record must not decide."""
    votes = Counter(f for f in (detect_format(r) for _, r in raw[:DETECT_SAMPLE]) if f is not None)
    if not votes:
        number, first = raw[0]
        raise DataFormatError(
            [f"{where(path, number)}: cannot tell the format from fields {sorted(first)}; "
             f"pass --format (one of {', '.join(FORMATS)})"]
        )
    return votes.most_common(1)[0][0]


def _chosen_conversations_from(convert):
    """Wrap a preference converter so it yields the conversation prompt + chosen reply."""

    def chosen_conversation(record: dict, report: LoadReport) -> dict:
        pair = convert(record, report)
        if not "".join(m["content"] for m in pair["chosen"]).strip():
            raise SkipRecord("empty_response")
        return {"messages": pair["prompt"] + pair["chosen"]}

    return chosen_conversation


def _prompts_from(convert):
    """Wrap a converter so it yields ``{"prompt": ...}`` (PPO and evaluation need prompts only)."""

    def to_prompt(record: dict, report: LoadReport) -> dict:
        prompt = prompt_of(convert(record, report))
        if not prompt or prompt[-1]["role"] != "user":
            raise SkipRecord("prompt_not_ending_on_user")
        return {"prompt": prompt}

    return to_prompt


def validate_converted(record: dict, loc: str) -> list[str]:
    if "messages" in record:
        return validate_conversation(record["messages"], loc)
    return [p for name in ("prompt", "chosen", "rejected") if name in record
            for p in validate_conversation(record[name], f"{loc}: {name}")]


def _fingerprint(record: dict) -> str:
    # ASCII-escaped: a lone surrogate (from a JSON "\ud800" escape) cannot be encoded as UTF-8
    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()


def prompt_of(record: dict) -> list[dict]:
    """The prompt of a record: its ``prompt``, or a conversation up to its last assistant reply."""
    if "prompt" in record:
        return record["prompt"]
    messages = record["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]


def split_records(records: list[dict], eval_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic split by a hash of (seed, prompt): order-independent, and no prompt in both halves.

    Each prompt draws a number in [0, 1) from its hash and goes to eval below ``eval_fraction``. On tiny
    data sets that can leave a half empty; then the prompt with the lowest (highest) draw is moved, so
    both halves are non-empty whenever there are two distinct prompts, and prompts still never straddle.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0 or not records:
        return list(records), []
    draws = [_draw(seed, prompt_of(r)) for r in records]
    distinct = sorted(set(draws))
    if len(distinct) == 1:
        return list(records), []  # one prompt cannot be split without straddling: all of it trains
    threshold = eval_fraction
    if threshold <= distinct[0]:
        threshold = distinct[1]  # nothing drawn for eval: the lowest prompt goes there
    elif threshold > distinct[-1]:
        threshold = distinct[-1]  # nothing left for training: the highest prompt stays there
    held_out = [r for r, d in zip(records, draws) if d < threshold]
    train = [r for r, d in zip(records, draws) if d >= threshold]
    return train, held_out


def _draw(seed: int, prompt: list[dict]) -> float:
    digest = hashlib.sha1(f"{seed}:{json.dumps(prompt, sort_keys=True)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def turn_stats(records: list[dict]) -> dict:
    """Turn counts and character lengths, for ``rlhf data inspect`` and load-time summaries."""
    turns, chars, roles, multi_turn = [], [], Counter(), 0
    for r in records:
        messages = r["messages"] if "messages" in r else r["prompt"] + r.get("chosen", [])
        turns.append(len(messages))
        chars.append(sum(len(m["content"]) for m in messages))
        roles.update(m["role"] for m in messages)
        multi_turn += sum(m["role"] == "user" for m in messages) > 1
    if not turns:
        return {}
    return {
        "turns_min": min(turns),
        "turns_mean": round(sum(turns) / len(turns), 2),
        "turns_max": max(turns),
        "multi_turn_records": multi_turn,
        "chars_mean": round(sum(chars) / len(chars), 1),
        "chars_max": max(chars),
        "messages_by_role": dict(roles),
    }
