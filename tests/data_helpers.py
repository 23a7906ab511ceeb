"""Small files for the data tests: write records in a container, load them, build turns."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from rlhf.data import load_records

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
