"""Messages the project knows are expected, silenced narrowly: each filter drops one message, where it arises.

Anything else the same loggers say still shows (docs/design.md: errors and warnings a user can act on).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _DropMessages(logging.Filter):
    def __init__(self, expected):
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.expected(record.getMessage())


def only_a_new_score_head(message: str) -> bool:
    """A transformers LOAD REPORT whose every row is a ``score.*`` weight MISSING: the head a reward model
    built from a causal LM gets by design. A report naming any other key is not expected."""
    if "LOAD REPORT" not in message:
        return False
    rows = [[cell.strip() for cell in _ANSI.sub("", line).split("|")] for line in message.splitlines() if "|" in line]
    keys = [row for row in rows if row[0] and row[0] != "Key" and not set(row[0]) <= set("-+")]
    return bool(keys) and all(row[0].startswith("score.") and row[1:2] == ["MISSING"] for row in keys)


@contextlib.contextmanager
def new_score_head_expected():
    """Around ``AutoModelForSequenceClassification.from_pretrained`` of a causal LM."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropMessages(only_a_new_score_head)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def quiet_cpu_runs() -> None:
    """On a machine without an accelerator: DeepSpeed's import-time "Setting accelerator to CPU" (every
    process of every stage) and torch's pin_memory notice, both saying what the user already knows."""
    logging.getLogger("DeepSpeed").addFilter(_DropMessages(lambda m: m.startswith("Setting accelerator to CPU.")))
    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator is found")
