"""Raw records from local files (json, jsonl, jsonl.gz, parquet) or the Hugging Face Hub.

Each record comes with its number (JSONL: the line number; JSON list and parquet: the position from 1)
so every later error can name ``file:record``. Malformed files fail here with every problem listed.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib

from ..paths import is_local_path
from .schema import DataFormatError, where

MAX_PROBLEMS_SHOWN = 20
LOCAL_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
# suffixes no Hub dataset id carries: a missing file with one of them is a typo, not a Hub name
FILE_LIKE_SUFFIXES = LOCAL_SUFFIXES + (".gz", ".csv", ".tsv", ".txt", ".arrow")
GZIP_MAGIC, PARQUET_MAGIC = b"\x1f\x8b", b"PAR1"
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# Document wrappers such as {"data": [...]}; any other dict is a single record.
WRAPPER_KEYS = {"data", "train", "test", "validation", "records", "examples", "rows", "instances", "items"}


def read_records(path, split: str = "train", max_records: int | None = None) -> list[tuple[int, dict]]:
    """All records of a local file or a Hub dataset, as ``(record_number, dict)`` pairs."""
    path = os.path.expanduser(os.fspath(path))
    if not is_local_path(path, FILE_LIKE_SUFFIXES):
        return _read_hub(path, split, max_records)
    if not os.path.exists(path):
        raise DataFormatError([f"{path}: no such file"])
    if os.path.isdir(path):
        raise DataFormatError([f"{path}: is a directory; pass a data file (json, jsonl, jsonl.gz, parquet)"])
    raw = _read_bytes(path)
    if raw.startswith(PARQUET_MAGIC) or path.endswith(".parquet"):
        records = _read_parquet(path)
    else:
        records = _read_json_text(path, _decode(path, raw, split), split)
    if not records:
        raise DataFormatError([f"{path}: the file holds no records (empty file)"])
    return records[:max_records] if max_records else records


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        # by content, not by name: a gzipped file saved without .gz (or the reverse) still reads
        return gzip.decompress(raw) if raw.startswith(GZIP_MAGIC) else raw
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a truncated .gz
        raise DataFormatError([f"{path}: cannot be read: {e}"]) from e


def _decode(path: str, raw: bytes, split: str = "train") -> str:
    try:
        return raw.decode("utf-8-sig")  # tolerate a BOM, which some editors write
    except UnicodeDecodeError as e:
        raise DataFormatError([_locate_bad_bytes(path, raw, e, split)]) from e


def _locate_bad_bytes(path: str, raw: bytes, error: UnicodeDecodeError, split: str) -> str:
    """Name the record and field holding the first invalid byte, falling back to the line."""
    hint = f"bytes that are not valid UTF-8 ({error.reason}); re-encode the file as UTF-8"
    text = raw.decode("utf-8-sig", errors="surrogateescape")  # each bad byte becomes a findable lone surrogate
    try:
        records = _read_json_text(path, text, split)
    except (DataFormatError, RecursionError):
        records = []
    try:
        for number, record in records:
            field_name = _field_with_bad_bytes(record)
            if field_name is not None:
                return f"{where(path, number, field_name or None)}: {hint}"
    except RecursionError:  # nested deeper than this walk can follow: fall back to the line
        pass
    line = raw[: error.start].count(b"\n") + 1
    first_line = text.lstrip().split("\n", 1)[0].rstrip()
    if first_line.startswith("{") and first_line.endswith("}"):  # JSONL: the record number is the line number
        return f"{where(path, line)}: byte offset {error.start}: {hint}"
    return f"{path}:line {line}: byte offset {error.start}: {hint}"


def _field_with_bad_bytes(value, name: str = "") -> str | None:
    if isinstance(value, str):
        return name if any("\udc80" <= c <= "\udcff" for c in value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        sub = f"{name}[{key}]" if isinstance(key, int) else (f"{name}.{key}" if name else str(key))
        if isinstance(key, str) and _field_with_bad_bytes(key) is not None:
            return sub
        found = _field_with_bad_bytes(item, sub)
        if found is not None:
            return found
    return None


class _BadJSON(Exception):
    def __init__(self, msg: str, lineno: int = 1, colno: int = 1):
        super().__init__(msg)
        self.msg, self.lineno, self.colno = msg, lineno, colno


def _loads(text: str, start: int = 0):
    """``(value, end)`` of the JSON at ``text[start:]``; every failure becomes ``_BadJSON``."""
    try:
        return _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise _BadJSON(e.msg, e.lineno, e.colno) from None
    except RecursionError:
        raise _BadJSON("nested too deeply") from None
    except ValueError as e:  # an integer over Python's 4,300-digit limit
        raise _BadJSON(str(e).split(";")[0]) from None


def _load_document(text: str):
    value, end = _loads(text, _WHITESPACE.match(text).end())
    extra = _WHITESPACE.match(text, end).end()
    if extra != len(text):
        raise _BadJSON("Extra data", text.count("\n", 0, extra) + 1, extra - text.rfind("\n", 0, extra))
    return value


def _read_json_text(path: str, text: str, split: str = "train") -> list[tuple[int, dict]]:
    if not text.strip():
        return []
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and not path.endswith((".jsonl", ".jsonl.gz"))):
        try:
            return _records_from_document(path, _load_document(text), split)
        except _BadJSON as e:
            if stripped.startswith("[") or e.msg != "Extra data":
                number = _failing_element(text) if stripped.startswith("[") else None
                loc = f"{where(path, number)} (line {e.lineno})" if number else f"{path}:line {e.lineno}"
                raise DataFormatError([f"{loc}: invalid JSON: {e.msg} (column {e.colno})"]) from None
            # else: several objects, one per line: JSONL saved under .json
    try:
        return _read_jsonl_lines(path, text)
    except DataFormatError as jsonl_error:
        # a single pretty-printed object saved under .jsonl: read it as one document if it parses
        try:
            data = _load_document(text)
        except _BadJSON:
            raise jsonl_error from None
        return _records_from_document(path, data, split)


def _failing_element(text: str) -> int | None:
    """Number (from 1) of the element of a top-level JSON list that does not parse, None if unknown."""
    i, n = text.index("[") + 1, 0
    while True:
        i = _WHITESPACE.match(text, i).end()
        try:
            _, i = _loads(text, i)
        except _BadJSON:
            return n + 1
        n += 1
        i = _WHITESPACE.match(text, i).end()
        if text.startswith("]", i):
            return None  # the list itself parses: the problem is after it
        if not text.startswith(",", i):
            return n + 1  # a missing comma: blame the element that should follow
        i += 1


def _records_from_document(path: str, data, split: str = "train") -> list[tuple[int, dict]]:
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if isinstance(data.get(split), list) and all(k.lower() in WRAPPER_KEYS for k in lists):
            data = data[split]  # {"train": [...], "test": [...]}: the split asked for
        elif len(lists) == 1 and lists[0].lower() in WRAPPER_KEYS:
            data = data[lists[0]]  # {"data": [...]} or {"train": [...]}: the one list is the records
        else:
            data = [data]  # a single record (its lists, e.g. "messages", are fields)
    if not isinstance(data, list):
        raise DataFormatError([f"{path}: expected a JSON list of objects or one object, got {type(data).__name__}"])
    problems = [
        f"{path}:record {i}: expected a JSON object, got {type(r).__name__}"
        for i, r in enumerate(data, 1)
        if not isinstance(r, dict)
    ]
    if problems:
        raise DataFormatError(problems[:MAX_PROBLEMS_SHOWN], len(problems))
    return list(enumerate(data, 1))


def _read_jsonl_lines(path: str, text: str) -> list[tuple[int, dict]]:
    """One object per line; the record number is the line number (blank lines count, as in editors)."""
    records, problems = [], []
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 etc., which JSON allows raw in strings
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.lstrip("\ufeff")  # a BOM per line: files concatenated with cat
        if not line.strip():
            continue
        try:
            record = _load_document(line)
        except _BadJSON as e:
            problems.append(f"{path}:record {lineno}: invalid JSON on line {lineno}: {e.msg} (column {e.colno})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path}:record {lineno}: expected a JSON object, got {type(record).__name__}")
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
    try:
        import datasets
    except ImportError as e:
        raise DataFormatError([f"{name}: not a local file, and `datasets` is not installed to load it"]) from e

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


def write_jsonl(path: str, records) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
