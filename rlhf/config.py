"""Stage configuration: dataclasses parsed from YAML then command-line overrides by ``trl.TrlParser``.

Overrides may be written ``--key value`` or ``key=value``; unknown keys (in the YAML file or on the
command line) are errors. The resolved configuration is printed at start and logged to W&B.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field

import yaml

FINETUNE_MODES = ("full", "lora", "partial")


@dataclass
class DataArguments:
    """Where the data comes from; ``dataset: demo`` is the embedded demo task."""

    dataset: str = field(default="demo", metadata={"help": "Local file, Hub dataset id, or 'demo'."})
    dataset_format: str = field(default="auto", metadata={"help": "Record format; 'auto' detects it."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read from a Hub dataset."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out file; else a split of `dataset`."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share held out when no eval_dataset is given."})
    max_records: int | None = field(default=None, metadata={"help": "Read at most this many records."})
    demo_seed: int = field(default=0, metadata={"help": "Seed of the generated demo task."})


@dataclass
class SFTScriptArguments(DataArguments):
    finetune: str = field(default="full", metadata={"help": "full | lora | partial", "choices": FINETUNE_MODES})
    freeze_layers: int = field(default=0, metadata={"help": "partial: freeze embeddings and the lower N layers."})
    train_top_layers: int | None = field(default=None, metadata={"help": "partial: train only the top K layers."})
    merge_lora: bool = field(default=False, metadata={"help": "lora: also save the merged model to OUTPUT/merged."})
    num_sample_generations: int = field(default=4, metadata={"help": "Samples printed/logged at each evaluation."})
    gold_eval_prompts: int = field(default=64, metadata={"help": "Demo task: held-out prompts scored by gold reward."})
    max_new_tokens: int = field(default=48, metadata={"help": "Generation length for samples and gold evaluation."})
    eval_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the gold evaluation."})
    wandb_project: str = field(default="rlhf", metadata={"help": "W&B project."})
    wandb_group: str | None = field(default=None, metadata={"help": "W&B group (one pipeline run = one group)."})


def normalise_overrides(argv: list[str], known: set[str] | None = None) -> list[str]:
    """Turn ``key=value`` overrides into ``--key value`` so argparse sees one style.

    With ``known`` (the parser's option names), only ``key=value`` whose key is an option is
    converted, so a value that contains ``=`` (``--run_name a=b``) is left alone. Unknown keys are
    converted too when they come first or after a complete option, so argparse reports them.
    """
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        awaiting_value = bool(out) and out[-1].startswith("--") and (known is None or out[-1] in known)
        if not arg.startswith("-") and eq and key.isidentifier() and (
            (known is not None and f"--{key}" in known) or not awaiting_value
        ):
            out += [f"--{key}", value]
        else:
            out.append(arg)
    return out


def parse_stage_args(dataclass_types: list, argv: list[str] | None = None):
    """Parse ``--config FILE`` plus overrides into the given dataclasses (unknown keys raise)."""
    from trl import TrlParser

    parser = TrlParser(dataclass_types)
    known = {s for action in parser._actions for s in action.option_strings} | {"--config"}
    argv = normalise_overrides(list(sys.argv[1:] if argv is None else argv), known)
    return parser.parse_args_and_config(argv)


def resolved_config(*objs) -> dict:
    """Every field of every config object, for printing and for W&B."""
    out = {}
    for obj in objs:
        values = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        out[type(obj).__name__] = json.loads(json.dumps(values, default=str))
    return out


def format_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=True, allow_unicode=True, width=120)
