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
    eval_dataset_split: str = field(default="test", metadata={"help": "Split to read when eval_dataset is on the Hub."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share held out when no eval_dataset is given."})
    max_records: int | None = field(default=None, metadata={"help": "Read at most this many records."})
    demo_seed: int = field(default=0, metadata={"help": "Seed of the generated demo task."})

    def __post_init__(self):
        # `key=null` on the command line arrives as a string; it means "unset"
        for name in self._nullable:
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() in ("null", "none", ""):
                setattr(self, name, None)

    _nullable = ("eval_dataset", "max_records")


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


@dataclass
class PPOConfig(DataArguments):
    """Everything the PPO stage reads. Batch sizes are global; derived sizes are computed once in ``derive``."""

    # models
    model_name_or_path: str = field(default="runs/demo/sft", metadata={"help": "SFT policy (Hub id or path)."})
    ref_model: str | None = field(default=None, metadata={"help": "Frozen reference; default: the policy."})
    reward_model: str | None = field(default=None, metadata={"help": "Local reward model path (num_labels=1)."})
    reward_url: str | None = field(default=None, metadata={"help": "Scoring API base URL instead of a local RM."})
    reward_function: str | None = field(default=None, metadata={"help": "'gold' (demo task) or 'module:function'."})
    critic_model: str | None = field(default=None, metadata={"help": "Critic init; default: the reward model."})
    topology: str = field(default="separate", metadata={
        "help": "separate (full policy + critic from the RM) | lora (one base: policy and critic adapters) | shared "
                "(one backbone, policy head + value head)", "choices": ("separate", "lora", "shared")})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Default: peft's choice per architecture."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32 | bfloat16 | float16."})
    # rollout
    batch_size: int = field(default=64, metadata={"help": "Prompts per PPO step, over all processes."})
    max_prompt_length: int = field(default=256, metadata={"help": "Longer prompts are cut from the left."})
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = field(default=0, metadata={"help": "0 = off; 1 makes sampling deterministic (tests)."})
    stop_tokens: list[str] | None = field(default=None, metadata={"help": "Default: the tokenizer's EOS."})
    missing_stop_penalty: float = field(default=1.0, metadata={"help": "Subtracted from the score of a reply with no stop token."})
    reward_normalization: bool = field(default=True, metadata={"help": "Normalise RM scores with the RM's stored mean/std."})
    whiten_rewards: bool = False
    # PPO
    ppo_epochs: int = 4
    num_minibatches: int = 1
    gradient_accumulation_steps: int = 1
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: str = field(default="k1", metadata={"choices": ("k1", "k3")})
    adaptive_kl: bool = False
    kl_target: float | None = None
    kl_horizon: int = 10000
    ratio_check_tolerance: float = field(default=1e-3, metadata={"help": "Max |ratio-1| on the first minibatch."})
    # PPO-ptx (InstructGPT): an SFT loss on demonstrations against forgetting
    ptx_coef: float = 0.0
    ptx_dataset: str | None = field(default=None, metadata={"help": "SFT data for PPO-ptx; 'demo' = demo SFT data."})
    ptx_batch_size: int = 16
    # optimisation
    learning_rate: float = 1e-5
    critic_learning_rate: float | None = field(default=None, metadata={"help": "Default: learning_rate."})
    adam_eps: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = field(default="linear", metadata={"choices": ("linear", "cosine", "constant")})
    warmup_steps: int = 0
    total_steps: int = 100
    seed: int = 0
    # logging, evaluation, checkpoints
    output_dir: str = "runs/demo/ppo"
    logging_steps: int = 1
    sample_every: int = 10
    num_samples: int = 4
    eval_prompts: int = 64
    eval_temperature: float = 1.0
    save_every: int = 0
    resume: bool = field(default=False, metadata={"help": "Continue from the latest checkpoint in output_dir."})
    report_to: str = field(default="wandb", metadata={"choices": ("wandb", "none")})
    run_name: str = "ppo"
    wandb_project: str = "rlhf"
    wandb_group: str | None = None

    _nullable = ("eval_dataset", "ref_model", "reward_model", "reward_url", "reward_function", "critic_model",
                 "ptx_dataset", "kl_target")

    def derive(self, world_size: int) -> PPODerived:
        """Per-process batch sizes, checked once: every split must be exact."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by the {world_size} processes")
        local = self.batch_size // world_size
        if local % self.num_minibatches:
            raise ValueError(f"per-process batch {local} must be divisible by num_minibatches={self.num_minibatches}")
        minibatch = local // self.num_minibatches
        if minibatch % self.gradient_accumulation_steps:
            raise ValueError(f"minibatch {minibatch} must be divisible by gradient_accumulation_steps="
                             f"{self.gradient_accumulation_steps}")
        if sum(x is not None for x in (self.reward_model, self.reward_url, self.reward_function)) != 1:
            raise ValueError("set exactly one of reward_model, reward_url, reward_function")
        return PPODerived(local, minibatch, minibatch // self.gradient_accumulation_steps)


@dataclass
class PPODerived:
    local_batch_size: int  # prompts per process per step
    local_minibatch_size: int  # sequences per optimiser step per process
    micro_batch_size: int  # sequences per forward/backward
