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
        if not isinstance(m.get("content"), str):
            problems.append(f"{loc}: message {i}: content is {type(m.get('content')).__name__}, not a string")
    return problems
