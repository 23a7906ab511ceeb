"""Data: every supported format -> one internal schema; validation, splits, and the demo task."""

from .formats import FORMATS, POLICIES, detect_format
from .loading import load_records, prompt_of, split_records, turn_stats
from .schema import DataFormatError, LoadReport

__all__ = [
    "FORMATS", "POLICIES", "DataFormatError", "LoadReport", "detect_format", "load_records",
    "prompt_of", "split_records", "turn_stats",
]
