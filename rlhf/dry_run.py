"""Dry run of one stage: parse and validate its configuration, then resolve its models and data.

Nothing is trained or downloaded. A Hub model or dataset that cannot be reached (no network, as in CI) is
judged as the stage judges it (``rlhf.hub``): offline and not cached, the stage's own error is printed as a
warning and not counted as a problem, since the run may have network; a local path that does not exist, an
unknown config key, a batch size that does not divide, or a data file that fails validation is.
"""

from __future__ import annotations

from .errors import UsageError
from .hub import check_dataset_source, check_model_source
from .paths import is_local_path

RUN_TIME = "not counted: with network the run fetches it"


def check_model(label: str, path: str | None, produced: set[str]) -> int:
    if not path:
        return 0
    if path in produced:
        print(f"  {label}: {path} (written by an earlier stage)")
        return 0
    if path.startswith("tiny:"):
        print(f"  {label}: {path} (built offline)")
        return 0
    if path.startswith("gguf:"):
        print(f"  {label}: {path} (converted from the GGUF package at run time)")
        return 0
    from transformers import AutoConfig

    try:
        check_model_source(label, path)
    except UsageError as e:
        if is_local_path(path):
            print(f"  {label}: PROBLEM: {e}")
            return 1
        print(f"  {label}: WARNING: {e} ({RUN_TIME})")
        return 0
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # a directory that is not a model
        print(f"  {label}: {path}: PROBLEM: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return 1
    print(f"  {label}: {path} ({config.model_type}, hidden {getattr(config, 'hidden_size', '?')}, "
          f"layers {getattr(config, 'num_hidden_layers', '?')})")
    return 0


def check_data(args, kind: str) -> int:
    from .data import DataFormatError
    from .data.readers import FILE_LIKE_SUFFIXES
    from .data.sources import resolve_stage_data

    if args.dataset != "demo" and not is_local_path(args.dataset, FILE_LIKE_SUFFIXES):
        try:
            print(f"  {check_dataset_source(args.dataset)}")
        except UsageError as e:
            print(f"  dataset: WARNING: {e} ({RUN_TIME})")
        return 0
    try:
        train, held_out, _, lines = resolve_stage_data(args, kind)
    except (DataFormatError, FileNotFoundError) as e:
        print(f"  dataset: PROBLEM: {e}")
        return 1
    print("  " + "\n  ".join(lines))
    print(f"  dataset: {len(train)} training and {len(held_out)} held-out {kind} records")
    return 0


def check_stage(stage, argv: list[str], produced: set[str], world_size: int = 1) -> int:
    try:
        parsed = stage.parse(argv)  # on a CPU-only machine bf16 configs validate too (stages.cpu_training_arguments)
    except (ValueError, SystemExit, UsageError) as e:
        print(f"  config: PROBLEM: {e}")
        return 1
    print(f"  config: {argv[1]} parsed ({', '.join(type(p).__name__ for p in parsed)})")
    problems = 0
    for key in stage.model_keys:
        holder = next(p for p in parsed if hasattr(p, key))
        problems += check_model(key, getattr(holder, key), produced)
    if hasattr(parsed[0], "derive"):
        try:
            print(f"  batch sizes per process: {parsed[0].derive(world_size)}")
        except ValueError as e:
            print(f"  config: PROBLEM: {e}")
            problems += 1
    return problems + check_data(parsed[0], stage.data_kind)
