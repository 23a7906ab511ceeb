"""``rlhf data inspect FILE ...``: what a data file holds and what a loader would keep, skip or repair."""

from __future__ import annotations

import argparse
import json
import sys

from .loading import load_records, turn_stats
from .schema import DataFormatError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf data", allow_abbrev=False, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="record counts, turn statistics and defect counts of data files")
    inspect.add_argument("paths", nargs="+", help="local files (json, jsonl, jsonl.gz, parquet) or Hub dataset ids")
    inspect.add_argument("--format", default="auto", help="override format detection")
    inspect.add_argument("--max-records", type=int, default=None)
    inspect.add_argument("--json", action="store_true", help="also print one JSON line per file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = 0
    for path in args.paths:
        try:
            records, report = load_records(path, format=args.format, max_records=args.max_records)
        except DataFormatError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        print("\n".join(report.summary_lines()))
        for key, value in turn_stats(records).items():
            print(f"  {key:<18} {value}")
        if args.json:
            print(json.dumps({**report.to_dict(), **turn_stats(records)}, ensure_ascii=False))
    return status
