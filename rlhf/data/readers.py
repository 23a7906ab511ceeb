"""Raw records from local files (json, jsonl, jsonl.gz, parquet) or the Hugging Face Hub.

Each record comes with its number (JSONL: the line number; JSON list and parquet: the position from 1)
so every later error can name ``file:record``. Malformed files fail here with every problem listed.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator

from .schema import DataFormatError

MAX_PROBLEMS_SHOWN = 20
LOCAL_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")


def is_local(path: str) -> bool:
    return os.path.exists(path) or path.endswith(LOCAL_SUFFIXES)


def read_records(path: str, split: str = "train", max_records: int | None = None) -> list[tuple[int, dict]]:
    """All records of a local file or a Hub dataset, as ``(record_number, dict)`` pairs."""
    if not is_local(path):
        return _read_hub(path, split, max_records)
    if not os.path.exists(path):
        raise DataFormatError([f"{path}: no such file"])
    if path.endswith(".parquet"):
        records = _read_parquet(path)
    else:
        records = _read_json_text(path, _decode(path))
    if not records:
        raise DataFormatError([f"{path}: the file holds no records (empty file)"])
    return records[:max_records] if max_records else records


def _decode(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a truncated or non-gzip .gz file
        raise DataFormatError([f"{path}: cannot be read: {e}"]) from e
    try:
        return raw.decode("utf-8-sig")  # tolerate a BOM, which some editors write
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFormatError(
            [f"{path}:line {line}: bytes at offset {e.start} are not valid UTF-8 ({e.reason}); re-encode the file as UTF-8"]
        ) from e


def _read_json_text(path: str, text: str) -> list[tuple[int, dict]]:
    if not text.strip():
        return []
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and not path.endswith((".jsonl", ".jsonl.gz"))):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if stripped.startswith("[") or e.msg != "Extra data":
                raise DataFormatError([f"{path}:line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})"]) from e
            data = None  # several objects, one per line: JSONL saved under .json
        if data is not None:
            return _records_from_document(path, data)
    return _read_jsonl_lines(path, text)


def _records_from_document(path: str, data) -> list[tuple[int, dict]]:
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1 and all(not isinstance(v, list) for k, v in data.items() if k != lists[0]):
            data = data[lists[0]]  # {"data": [...]} or {"train": [...]}: the one list is the records
        else:
            data = [data]  # a single record
    problems = [
        f"{path}:record {i}: expected a JSON object, got {type(r).__name__}"
        for i, r in enumerate(data, 1)
        if not isinstance(r, dict)
    ]
    if problems:
        raise DataFormatError(problems[:MAX_PROBLEMS_SHOWN], len(problems))
    return list(enumerate(data, 1))


def _read_jsonl_lines(path: str, text: str) -> list[tuple[int, dict]]:
    records, problems = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:line {lineno}: invalid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path}:line {lineno}: expected a JSON object, got {type(record).__name__}")
            continue
        records.append((lineno, record))
    if problems:
        raise DataFormatError(problems[:MAX_PROBLEMS_SHOWN], len(problems))
    return records


def _read_parquet(path: str) -> list[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataFormatError([f"{path}: not a readable parquet file: {e}"]) from e
    return list(enumerate(rows, 1))


def _read_hub(name: str, split: str, max_records: int | None) -> list[tuple[int, dict]]:
    """A dataset on the Hub (``name`` or ``name:config``), through ``datasets``."""
    import datasets

    repo, _, config = name.partition(":")
    if max_records:
        split = f"{split}[:{max_records}]"
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # network, auth, missing split: all surface as one clear message
        raise DataFormatError(
            [f"{name}: not a local file, and loading it from the Hugging Face Hub failed: {type(e).__name__}: {e}"]
        ) from e
    return list(enumerate(ds, 1))


def iter_jsonl(path: str) -> Iterator[dict]:
    """Records of a JSONL file the project wrote itself (no error collection needed)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: str, records) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
