"""A stage's data arguments -> train / held-out records (and, on the demo task, gold-eval prompts)."""

from __future__ import annotations

from .demo_task import demo_data_paths
from .loading import load_records, split_records

DEMO_FILES_BY_KIND = {"sft": ("sft_train", "sft_eval"), "preference": ("pairs_train", "pairs_eval"),
                      "prompt": ("sft_train", "prompts_eval")}


def resolve_stage_data(args, kind: str) -> tuple[list[dict], list[dict], list[list[dict]] | None, list[str]]:
    """(train, held-out, gold-eval prompts or None, load-report lines) for ``args`` (a DataArguments).

    ``dataset: demo`` reads the generated demo files; otherwise ``dataset`` is a file or Hub id, held
    out by ``eval_dataset`` or by a deterministic ``eval_fraction`` split.
    """
    gold_prompts = None
    dataset, eval_dataset = args.dataset, args.eval_dataset
    if dataset == "demo":
        paths = demo_data_paths(args.demo_seed)
        train_name, eval_name = DEMO_FILES_BY_KIND[kind]
        dataset, eval_dataset = paths[train_name], eval_dataset or paths[eval_name]
        gold_prompts = [r["prompt"] for r in load_records(paths["prompts_eval"], kind="prompt")[0]]
    train, report = load_records(dataset, args.dataset_format, kind, args.dataset_split, args.max_records)
    lines = report.summary_lines()
    if eval_dataset:
        fmt = None if args.dataset == "demo" else args.dataset_format
        eval_cap = getattr(args, "eval_max_records", None) or args.max_records
        held_out, eval_report = load_records(eval_dataset, fmt, kind, getattr(args, "eval_dataset_split", "test"),
                                             eval_cap)
        lines += eval_report.summary_lines()
    else:
        train, held_out = split_records(train, args.eval_fraction, seed=args.demo_seed)
        lines.append(f"  split: train={len(train)} eval={len(held_out)} (eval_fraction={args.eval_fraction})")
    return train, held_out, gold_prompts, lines
