"""The one internal schema every data format is converted to, and the errors and counters of loading.

A *conversation* is a list of ``{"role", "content"}`` dicts (roles: system, user, assistant), the
shape TRL and chat templates take directly. A *preference pair* is the prompt (a conversation that
ends on a user turn) plus the chosen and the rejected response (each a list of assistant messages,
usually one): the conversational preference shape of ``trl.RewardTrainer``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
LONG_TEXT = 2000  # characters; only noted, since truncation is the tokenizer's job


class DataFormatError(ValueError):
    """Input that cannot be read as the format it claims to be.

    Carries every problem found (``file:record: field: message``), so a user fixes them all at once.
    """

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        total = len(problems) if total is None else total
        shown = "\n  ".join(problems)
        more = f"\n  ... and {total - len(problems)} more" if total > len(problems) else ""
        super().__init__(f"{total} problem(s) in the input:\n  {shown}{more}")


def where(path: str, record: int | None, field_name: str | None = None) -> str:
    """Format a location as ``file:record N: field`` (records are numbered from 1, like lines)."""
    out = str(path)
    if record is not None:
        out += f":record {record}"
    if field_name:
        out += f": field '{field_name}'"
    return out


@dataclass
class LoadReport:
    """What happened to each record: kept, skipped (and why), repaired (and how)."""

    source: str
    format: str = ""
    kind: str = ""  # "sft" or "preference"
    records_read: int = 0
    records_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    noted: Counter = field(default_factory=Counter)  # kept as is, counted for information

    def summary_lines(self) -> list[str]:
        lines = [
            f"{self.source}: format={self.format} kind={self.kind} "
            f"read={self.records_read} kept={self.records_kept} skipped={sum(self.skipped.values())}"
        ]
        for title, counter in (("skipped", self.skipped), ("repaired", self.repaired), ("noted", self.noted)):
            for reason, count in sorted(counter.items()):
                lines.append(f"  {title:<8} {reason}: {count}")
        return lines

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "kind": self.kind,
            "records_read": self.records_read,
            "records_kept": self.records_kept,
            "skipped": dict(self.skipped),
            "repaired": dict(self.repaired),
            "noted": dict(self.noted),
        }


class SkipRecord(Exception):
    """Raised by a converter for a record that a documented policy drops (the reason is counted)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def validate_conversation(messages: list[dict], loc: str) -> list[str]:
    """Problems with a converted conversation (empty list when it is well formed)."""
    problems = []
    if not messages:
        problems.append(f"{loc}: conversation has no messages")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            problems.append(f"{loc}: message {i}: role {m.get('role')!r} is not one of {ROLES}")
        content = m.get("content")
        if not isinstance(content, str):
            problems.append(f"{loc}: message {i}: content is {type(content).__name__}, not a string")
        elif not _encodable(content):
            # a JSON "\\ud800" escape decodes to a lone surrogate: tokenizers and UTF-8 writers reject it
            problems.append(f"{loc}: message {i}: content holds a lone surrogate (invalid Unicode escape)")
    return problems


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def merge_same_role(messages: list[dict], report: LoadReport) -> list[dict]:
    """Join runs of one role (chat templates want alternation), counting the repair."""
    out: list[dict] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
            report.repaired["merged_same_role_turns"] += 1
        else:
            out.append(dict(m))
    return out


def no_user_text(messages: list[dict]) -> bool:
    return not any(m["content"].strip() for m in messages if m["role"] == "user")


def note_long(messages: list[dict], report: LoadReport) -> None:
    if any(len(m["content"]) > LONG_TEXT for m in messages):
        report.noted["long_text"] += 1
