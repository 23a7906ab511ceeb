"""User mistakes: one line on stderr that names what is wrong and the fix, exit status 2, no traceback.

Code that finds a mistake a user can fix (a path that does not exist, an unknown key, a value of the wrong
type) raises ``UsageError``; ``rlhf.cli.main`` prints it. Under ``accelerate launch`` only the main process
prints it, so the user reads it once.
"""

from __future__ import annotations

import difflib
import os
import sys

USAGE_EXIT = 2


class UsageError(ValueError):
    """A mistake in what the user asked for; its message is the whole report (one line)."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())  # one line, whatever the message was built from


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def report(prefix: str, error: UsageError) -> int:
    """Print the mistake once (on the launch's first process) and return the exit status."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prefix}: error: {error}", file=sys.stderr)
    return USAGE_EXIT
