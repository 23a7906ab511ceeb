"""Every stage's configuration: dataclasses parsed from YAML, then command-line overrides, by ``trl.TrlParser``.

Overrides may be written ``--key value`` or ``key=value``, the config ``--config FILE`` or as the first
argument; unknown keys (in the YAML file or on the command line) are one-line errors with "did you mean". The SFT and reward stages also take every field of TRL's ``ModelConfig`` and
``SFTConfig`` / ``RewardConfig``; PPO, which TRL no longer has, is ``PPOConfig`` below. Each stage writes
its resolved configuration to ``OUTPUT/config.yaml`` and to W&B.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import warnings
from dataclasses import dataclass, field

import yaml

FINETUNE_MODES = ("full", "lora", "partial")
REPORT_TO = ("wandb", "tensorboard", "none")


def _null_to_none(obj, names) -> None:
    """``key=null`` on the command line arrives as a string; it means "unset"."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, str) and value.lower() in ("null", "none", ""):
            setattr(obj, name, None)


@dataclass
class DataArguments:
    """Where a stage's data comes from; ``dataset: demo`` is the embedded demo task."""

    dataset: str = field(default="demo", metadata={"help": "Local file, Hub dataset id, or 'demo'."})
    dataset_format: str = field(default="auto", metadata={"help": "Record format; 'auto' detects it."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read from a Hub dataset."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out file; else a split of `dataset`."})
    eval_dataset_split: str = field(default="test", metadata={"help": "Split to read when eval_dataset is on the Hub."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share held out when no eval_dataset is given."})
    max_records: int | None = field(default=None, metadata={"help": "Read at most this many records."})
    eval_max_records: int | None = field(default=None, metadata={
        "help": "Read at most this many held-out records from eval_dataset; default: max_records."})
    demo_seed: int = field(default=0, metadata={"help": "Seed of the generated demo task."})

    def __post_init__(self):
        _null_to_none(self, ("eval_dataset", "max_records", "eval_max_records"))


@dataclass
class TrackingArguments:
    """W&B placement; ``report_to`` and ``run_name`` come from TrainingArguments (SFT, RM) or PPOConfig."""

    wandb_project: str = field(default="rlhf", metadata={"help": "W&B project."})
    wandb_group: str | None = field(default=None, metadata={"help": "W&B group (one pipeline run = one group)."})


@dataclass
class SFTScriptArguments(TrackingArguments, DataArguments):
    finetune: str = field(default="full", metadata={"help": "full | lora | partial", "choices": FINETUNE_MODES})
    freeze_layers: int = field(default=0, metadata={"help": "partial: freeze embeddings and the lower N layers."})
    train_top_layers: int | None = field(default=None, metadata={"help": "partial: train only the top K layers."})
    merge_lora: bool = field(default=False, metadata={"help": "lora: also save the merged model to OUTPUT/merged."})
    num_sample_generations: int = field(default=4, metadata={"help": "Samples printed/logged at each evaluation."})
    gold_eval_prompts: int = field(default=64, metadata={"help": "Demo task: held-out prompts scored by gold reward."})
    max_new_tokens: int = field(default=48, metadata={"help": "Generation length for samples and gold evaluation."})
    eval_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the gold evaluation."})


@dataclass
class RewardScriptArguments(TrackingArguments, DataArguments):
    finetune: str = field(default="full", metadata={"help": "full | lora", "choices": ("full", "lora")})
    label_smoothing: float = field(default=0.0, metadata={"help": "Conservative BT loss: weight of the flipped label."})
    use_margin: bool = field(default=False, metadata={"help": "Use each pair's `margin` field in the loss."})
    stats_max_pairs: int = field(default=2000, metadata={"help": "Training pairs scored for reward mean/std."})


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


# PPO keys renamed to TRL's names; the old ones keep working for one release (0.2) with a warning
DEPRECATED_PPO_KEYS = {"total_steps": "max_steps", "save_every": "save_steps", "sample_every": "num_sample_generations"}


@dataclass
class PPOConfig(TrackingArguments, DataArguments):
    """Everything the PPO stage reads. Batch sizes are global; per-process sizes come from ``derive``."""

    # models
    model_name_or_path: str = field(default="runs/demo/sft", metadata=_help("SFT policy: Hub id or local path."))
    ref_model: str | None = field(default=None, metadata=_help("Frozen KL reference; default: the policy."))
    reward_model: str | None = field(default=None, metadata=_help("Local reward model (sequence classifier)."))
    reward_url: str | None = field(default=None, metadata=_help("Scoring API base URL instead of a local RM."))
    reward_function: str | None = field(default=None, metadata=_help(
        "'gold' (demo task) or 'module:function' taking (prompt, response) -> float."))
    rewards: list[str] | None = field(default=None, metadata=_help(
        "Several weighted reward sources (YAML list of {model|url|function, weight, name}; on the command line "
        "as JSON objects); see the README."))
    critic_model: str | None = field(default=None, metadata=_help("Where the critic starts; default: the RM."))
    topology: str = field(default="separate", metadata=_help(
        "separate (policy + critic from the RM + reference copy) | lora (one frozen base: policy and critic "
        "adapters) | shared (one backbone, LM head + value head)", choices=("separate", "lora", "shared")))
    lora_r: int = field(default=16, metadata=_help("lora topology: adapter rank."))
    lora_alpha: int = field(default=32, metadata=_help("lora topology: adapter scale."))
    lora_target_modules: list[str] | None = field(default=None, metadata=_help("Default: peft's per architecture."))
    dtype: str = field(default="float32", metadata=_help(
        "Weights dtype: float32 (trained weights stay fp32; compute precision is bf16/fp16 below). bfloat16 / "
        "float16 only with topology lora, where the base is frozen and the adapters stay fp32."))
    bf16: bool = field(default=False, metadata=_help("bf16 autocast over fp32 master weights (also: the accelerate "
                                                     "config's mixed_precision)."))
    fp16: bool = field(default=False, metadata=_help("fp16 autocast with a grad scaler (CUDA only)."))
    activation_checkpointing: bool = field(default=False, metadata=_help("Recompute activations in the backward: "
                                                                         "memory for compute."))
    attn_implementation: str | None = field(default=None, metadata=_help("sdpa | eager | flash_attention_2; "
                                                                         "default: transformers' choice."))
    trust_remote_code: bool = field(default=False, metadata=_help("Allow models whose code ships with the checkpoint."))
    # rollout
    batch_size: int = field(default=64, metadata=_help("Prompts per PPO step, over all processes."))
    max_prompt_length: int = field(default=256, metadata=_help("Longer prompts are cut from the left."))
    max_new_tokens: int = field(default=32, metadata=_help("Reply length limit in tokens."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature (logprobs use the same)."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling; 1 = off."))
    top_k: int = field(default=0, metadata=_help("0 = off; 1 makes sampling deterministic (tests)."))
    local_rollout_forward_batch_size: int | None = field(default=None, metadata=_help(
        "Sequences per forward pass when scoring a rollout (logprobs, values); default: the update's micro-batch, "
        "whose shapes give the same kernels, so even bf16 logprobs agree exactly with the update's."))
    stop_tokens: list[str] | None = field(default=None, metadata=_help("Tokens that end a reply; default: EOS."))
    missing_stop_penalty: float = field(default=1.0, metadata=_help("Subtracted from a reply with no stop token."))
    reward_normalization: bool = field(default=True, metadata=_help("Normalize RM scores by its stored mean/std."))
    whiten_rewards: bool = field(default=False, metadata=_help("Whiten per-token rewards over the batch."))
    # the estimator family
    advantage_estimator: str = field(default="gae", metadata=_help(
        "gae (PPO with a critic) | grpo | dr_grpo | rloo | reinforce_pp (critic-free: no critic is built).",
        choices=("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")))
    samples_per_prompt: int = field(default=1, metadata=_help("Replies sampled per prompt (a group; >= 2 for grpo, "
                                                              "dr_grpo, rloo)."))
    kl_penalty: str = field(default="reward", metadata=_help(
        "Where beta*KL goes: reward (per token, PPO/REINFORCE++) | loss (a KL term, GRPO-style) | none.",
        choices=("reward", "loss", "none")))
    # PPO
    ppo_epochs: int = field(default=4, metadata=_help("Passes over each rollout batch."))
    num_minibatches: int = field(default=1, metadata=_help("Optimiser steps per pass."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimiser step."))
    clip_range: float = field(default=0.2, metadata=_help("Policy ratio clip epsilon."))
    clip_range_high: float | None = field(default=None, metadata=_help(
        "Upper clip epsilon (DAPO's clip-higher, e.g. 0.28); default: clip_range."))
    loss_agg_mode: str = field(default="token-mean", metadata=_help(
        "token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm (Dr. GRPO), over the whole "
        "minibatch (all processes).",
        choices=("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")))
    clip_range_value: float = field(default=0.2, metadata=_help("Value clip around the rollout's values."))
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss."))
    ent_coef: float = field(default=0.0, metadata=_help("Entropy bonus weight; 0 = off."))
    gamma: float = field(default=1.0, metadata=_help("GAE discount."))
    lam: float = field(default=0.95, metadata=_help("GAE lambda."))
    kl_coef: float = field(default=0.05, metadata=_help("beta of the per-token KL penalty (initial, if adaptive)."))
    kl_estimator: str = field(default="k1", metadata=_help("k1 (log ratio), k2 (squared) or k3 (non-negative).",
                                                           choices=("k1", "k2", "k3")))
    adaptive_kl: bool = field(default=False, metadata=_help("Move beta towards kl_target (Ziegler et al.)."))
    kl_target: float | None = field(default=None, metadata=_help("Target KL per sequence for adaptive_kl."))
    kl_horizon: int = field(default=10000, metadata=_help("Adaptive KL horizon, in episodes."))
    ratio_check_tolerance: float = field(default=1e-3, metadata=_help("Max |ratio - 1| on the first minibatch."))
    # PPO-ptx (InstructGPT): an SFT loss on demonstrations against forgetting
    ptx_coef: float = field(default=0.0, metadata=_help("Weight of the PPO-ptx SFT loss; 0 = off."))
    ptx_dataset: str | None = field(default=None, metadata=_help("SFT data for PPO-ptx; 'demo' = demo SFT data."))
    ptx_batch_size: int = field(default=16, metadata=_help("Demonstrations per PPO-ptx micro-step."))
    # optimisation
    learning_rate: float = field(default=1e-5, metadata=_help("Policy learning rate."))
    critic_learning_rate: float | None = field(default=None, metadata=_help("Default: learning_rate."))
    adam_eps: float = field(default=1e-5, metadata=_help("AdamW epsilon."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (of all trained parameters)."))
    critic_max_grad_norm: float | None = field(default=None, metadata=_help(
        "Clip the critic's gradients on their own to this norm (and the policy's to max_grad_norm); default: "
        "one clip over both. Not under DeepSpeed, whose engine clips globally."))
    lr_scheduler_type: str = field(default="linear", metadata=_help("linear | cosine | constant.",
                                                                    choices=("linear", "cosine", "constant")))
    warmup_steps: int = field(default=0, metadata=_help("Optimiser steps of linear warm-up."))
    max_steps: int = field(default=100, metadata=_help("PPO steps (rollout + update) to run."))
    seed: int = field(default=0, metadata=_help("Seed of sampling, prompt order and minibatches."))
    # logging, evaluation, checkpoints
    output_dir: str = field(default="runs/demo/ppo", metadata=_help("Where the policy, critic and logs go."))
    logging_steps: int = field(default=1, metadata=_help("Log to W&B every N steps (metrics.jsonl: every step)."))
    num_sample_generations: int = field(default=10, metadata=_help("Sample tables over the run; 0 = none."))
    num_samples: int = field(default=4, metadata=_help("Rows per sample table."))
    eval_prompts: int = field(default=64, metadata=_help("Held-out prompts evaluated before and after."))
    eval_temperature: float = field(default=1.0, metadata=_help("Sampling temperature of the evaluation; 0 = greedy."))
    save_steps: int = field(default=0, metadata=_help("Checkpoint every N steps; 0 = only the final model."))
    resume: bool = field(default=False, metadata=_help("Continue from the latest checkpoint in output_dir."))
    report_to: list[str] = field(default_factory=lambda: ["wandb"], metadata=_help("wandb, tensorboard or none."))
    run_name: str = field(default="ppo", metadata=_help("W&B run name."))
    # deprecated names (TRL's are above); removed in 0.2
    total_steps: int | None = field(default=None, metadata=_help("Deprecated: use max_steps."))
    save_every: int | None = field(default=None, metadata=_help("Deprecated: use save_steps."))
    sample_every: int | None = field(default=None, metadata=_help("Deprecated: use num_sample_generations."))

    def __post_init__(self):
        _null_to_none(self, ("eval_dataset", "max_records", "eval_max_records", "ref_model", "reward_model", "reward_url",
                             "reward_function", "rewards", "critic_model", "ptx_dataset", "kl_target", "clip_range_high",
                             "local_rollout_forward_batch_size", "critic_max_grad_norm",
                             "attn_implementation"))
        if isinstance(self.report_to, str):  # `report_to: wandb` as in TrainingArguments
            self.report_to = [self.report_to]
        self.report_to = [r for r in self.report_to if r != "none"]
        bad = set(self.report_to) - set(REPORT_TO)
        if bad:
            raise ValueError(f"report_to: unknown {sorted(bad)}; use some of {list(REPORT_TO)}")
        for old, new in DEPRECATED_PPO_KEYS.items():
            value = getattr(self, old)
            if value is None:
                continue
            warnings.warn(f"PPO key `{old}` is deprecated and will be removed in 0.2; use `{new}`", FutureWarning,
                          stacklevel=2)
            if old == "sample_every":  # a period in steps -> a number of tables over the run
                value = math.ceil(self.max_steps / value) if value else 0
            setattr(self, new, value)
            setattr(self, old, None)

    @property
    def sample_period(self) -> int:
        """Steps between sample tables (TRL: max_steps // num_sample_generations); 0 = none."""
        return max(1, self.max_steps // self.num_sample_generations) if self.num_sample_generations else 0

    @property
    def mixed_precision(self) -> str | None:
        """accelerate's mixed_precision, when this config sets it (else the accelerate config/launch decides)."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else None

    @property
    def needs_critic(self) -> bool:
        return self.advantage_estimator == "gae"

    def derive(self, world_size: int) -> PPODerived:
        """Per-process batch sizes, checked once: every split must be exact. A process samples all
        ``samples_per_prompt`` replies of its own prompts, so a group never spans processes."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by the {world_size} processes")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.advantage_estimator in ("grpo", "dr_grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"advantage_estimator={self.advantage_estimator} compares the replies to one prompt: "
                             "set samples_per_prompt >= 2 (4-16 is usual)")
        prompts = self.batch_size // world_size
        local = prompts * self.samples_per_prompt
        if local % self.num_minibatches:
            raise ValueError(f"per-process batch of {prompts} prompts x {self.samples_per_prompt} samples = {local} "
                             f"sequences must be divisible by num_minibatches={self.num_minibatches}")
        minibatch = local // self.num_minibatches
        if minibatch % self.gradient_accumulation_steps:
            raise ValueError(f"minibatch {minibatch} must be divisible by gradient_accumulation_steps="
                             f"{self.gradient_accumulation_steps}")
        if sum(x is not None for x in (self.reward_model, self.reward_url, self.reward_function, self.rewards)) != 1:
            raise ValueError("set exactly one of reward_model, reward_url, reward_function, rewards")
        if self.dtype != "float32" and self.topology != "lora":
            raise ValueError(
                f"dtype: {self.dtype} would store the trained weights in {self.dtype} and let AdamW update them in "
                "place, where updates below the format's resolution are lost (10 steps at lr 1e-6 changed 1.9% of "
                "the weights in bf16, 99.98% in fp32). Keep dtype: float32 and set bf16: true (fp32 master weights, "
                "bf16 compute), or use topology: lora, whose frozen base may be bf16")
        if self.bf16 and self.fp16:
            raise ValueError("set bf16 or fp16, not both")
        return PPODerived(local, minibatch, minibatch // self.gradient_accumulation_steps, prompts)


@dataclass
class PPODerived:
    local_batch_size: int  # sequences per process per step (prompts x samples_per_prompt)
    local_minibatch_size: int  # sequences per optimiser step per process
    micro_batch_size: int  # sequences per forward/backward
    local_prompts: int  # prompts per process per step


# ---------------------------------------------------------------------------------------------
# parsing and printing


def normalize_overrides(argv: list[str], known: set[str] | None = None) -> list[str]:
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


def _unknown_keys(remaining: list[str]) -> list[str]:
    return [a[2:] for a in remaining if a.startswith("--")] or remaining


def _raise_usage(message: str):
    from .errors import UsageError

    raise UsageError(message)


def stage_help(parser, stage: str, common_keys: tuple[str, ...]) -> str:
    """``rlhf STAGE --help``: the usage, the keys users change most (help and default), then every key."""
    actions = {a.dest: a for a in parser._actions}
    width = max(map(len, common_keys), default=0)
    lines = [f"usage: rlhf {stage} --config FILE [key=value ...]   (also: rlhf {stage} FILE [key=value ...])", "",
             "FILE is a YAML of keys; key=value (or --key value) overrides it; unknown keys are errors.",
             f"Shipped examples: configs/demo/{stage}.yaml, configs/recipes/*/{stage}.yaml.", "",
             "keys changed most:"]
    for key in common_keys:
        action = actions[key]
        text = " ".join((action.help or "").replace("%%", "%").split()).split(". ")[0].rstrip(".")
        lines.append(f"  {key:<{width}}  {text} (default: {action.default!r})")
    return "\n".join(lines + ["", "every key:", parser.format_help()])


def parse_stage_args(dataclass_types: list, argv: list[str] | None = None, stage: str = "stage",
                     common_keys: tuple[str, ...] = ()):
    """Parse ``--config FILE`` (or a first positional FILE) plus overrides into the given dataclasses.

    Mistakes (no such config file, an unknown key in the YAML or on the command line, a value of the
    wrong type, a value a dataclass refuses) raise ``rlhf.errors.UsageError``: one line with the fix.
    """
    import yaml
    from trl import TrlParser

    from .errors import UsageError, did_you_mean
    from .paths import resolve_config

    # TRL's SFTConfig/RewardConfig default gradient_checkpointing=True, which transformers 5 calls deprecated:
    # a warning about TRL's default, not the user's config
    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = TrlParser(dataclass_types, prog=f"rlhf {stage}")
    parser.allow_abbrev = False  # `clip_rang=0.1` is a typo to report, not a prefix of clip_range to guess
    parser.error = _raise_usage  # argparse would print its usage block and exit; one line is enough
    known = {s for action in parser._actions for s in action.option_strings} | {"--config"}
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(stage_help(parser, stage, common_keys))
        raise SystemExit(0)
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:  # `rlhf sft configs/demo/sft.yaml`
        argv.insert(0, "--config")
    argv = normalize_overrides(argv, known)
    if "--config" in argv[:-1]:  # a path, or the name of a shipped config ("demo/ppo.yaml")
        at = argv.index("--config") + 1
        try:
            argv[at] = resolve_config(argv[at])
        except FileNotFoundError as e:
            raise UsageError(f"{e}; give an existing YAML file (the shipped ones are under configs/)") from None
    names = sorted(o[2:] for o in known if o.startswith("--") and "-" not in o[2:])
    try:
        *parsed, from_yaml, from_command_line = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
    except yaml.YAMLError as e:
        raise UsageError(f"{argv[argv.index('--config') + 1]}: not valid YAML: {e}") from None
    except ValueError as e:  # a dataclass's own check (__post_init__), or TRL's "must contain a YAML mapping"
        raise UsageError(f"{e}") from None
    for where, remaining in (("in the config file", from_yaml), ("on the command line", from_command_line)):
        if remaining:
            key = _unknown_keys(remaining)[0]
            raise UsageError(f"unknown key {key!r} {where}{did_you_mean(key, names)} "
                             f"(rlhf {stage} --help lists the keys)")
    return parsed


def resolved_config(*objs) -> dict:
    """Every field of every config object, for printing, ``config.yaml`` and W&B."""
    out = {}
    for obj in objs:
        values = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        out[type(obj).__name__] = json.loads(json.dumps(values, default=str))
    return out


def format_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=True, allow_unicode=True, width=120)


def save_config(config: dict, output_dir: str) -> str:
    """Write the resolved configuration to ``OUTPUT/config.yaml`` (the main process calls it): the record of
    what the run used, defaults included."""
    import os

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(format_config(config))
    return path
