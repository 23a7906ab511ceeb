"""The stage registry: each training stage's config dataclasses, runner, outputs and pipeline inputs.

The ``rlhf`` command, ``rlhf pipeline`` and its dry run all read ``STAGES``: adding a stage is one entry
here (and its runner). Every stage runs under ``accelerate launch -m rlhf <stage> --config FILE``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    runner: str  # "module:function", called with the parsed config objects; returns the summary dict
    data_kind: str  # what its dataset must hold: sft conversations, preference pairs, or prompts
    model_keys: tuple[str, ...]  # config keys that name models (the dry run resolves them)
    # in a pipeline: config key -> the earlier stage whose output directory it takes
    inputs: dict[str, str] = field(default_factory=dict)
    summary_file: str = ""  # written into output_dir
    # (label, summary key) pairs the pipeline's table shows for this stage
    figures: tuple[tuple[str, str], ...] = ()
    common_keys: tuple[str, ...] = ()  # shown first by ``rlhf <stage> --help``

    def config_types(self) -> list[type]:
        from . import config

        if self.name == "ppo":
            return [config.PPOConfig]
        from trl import ModelConfig, RewardConfig, SFTConfig  # slow to import: only when needed

        script = {"sft": config.SFTScriptArguments, "reward": config.RewardScriptArguments}[self.name]
        return [script, ModelConfig, SFTConfig if self.name == "sft" else RewardConfig]

    def parse(self, argv: list[str] | None = None) -> tuple:
        import sys

        from .config import parse_stage_args

        argv = list(sys.argv[1:] if argv is None else argv)
        if self.name != "ppo":  # TrainingArguments on a machine without a GPU
            argv += cpu_training_arguments(argv)
        return tuple(parse_stage_args(self.config_types(), argv, self.name, self.common_keys))

    def run(self, parsed: tuple) -> dict:
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)(*parsed)


def cpu_training_arguments(argv: list[str]) -> list[str]:
    """What TrainingArguments needs on a machine without a GPU, unless the user said otherwise: use_cpu (else
    bf16 -- TRL's default -- is refused), and gloo under DeepSpeed (whose CPU runs otherwise see one process)."""
    import torch

    from .distributed import deepspeed_on_cpu, fsdp2_requested

    if fsdp2_requested() and not torch.cuda.is_available():
        raise ValueError("FSDP2 for the SFT and reward stages needs GPUs: accelerate 1.16 switches the HF Trainer to "
                         "FSDP only for GPU device types, and on CPU it would silently run DDP. On CPU use DeepSpeed "
                         "(configs/accelerate/zero3.yaml); PPO shards with FSDP2 on CPU too")
    given = " ".join(argv)
    extra = []
    if not torch.cuda.is_available() and "use_cpu" not in given:
        extra.append("use_cpu=true")
    if deepspeed_on_cpu() and "ddp_backend" not in given:
        extra.append("ddp_backend=gloo")
    return extra


# the keys of the SFT and reward stages (TRL's trainers) users change most
TRAINER_KEYS = ("model_name_or_path", "dataset", "finetune", "output_dir", "learning_rate", "num_train_epochs",
                "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "report_to")

STAGES: dict[str, Stage] = {
    "sft": Stage(
        "sft", "supervised fine-tuning on demonstrations (trl.SFTTrainer)", "rlhf.sft:run_sft", "sft",
        ("model_name_or_path",), summary_file="sft_summary.json", common_keys=TRAINER_KEYS + ("max_length",),
        figures=(("train loss", "train_loss"), ("eval loss", "eval_loss"))),
    "reward": Stage(
        "reward", "reward model on preference pairs (trl.RewardTrainer)", "reward_models.train:run_reward",
        "preference", ("model_name_or_path",), inputs={"model_name_or_path": "sft"},
        summary_file="reward_summary.json", common_keys=TRAINER_KEYS + ("max_length", "label_smoothing"),
        figures=(("held-out accuracy", "eval/accuracy"), ("mean margin", "eval/mean_margin"),
                 ("truncated pairs", "truncated_pairs"))),
    "ppo": Stage(
        "ppo", "PPO against the reward model under a KL penalty (ours, on accelerate)", "rlhf.ppo.stage:run_ppo",
        "prompt", ("model_name_or_path", "ref_model", "reward_model", "critic_model"),
        inputs={"model_name_or_path": "sft", "reward_model": "reward"}, summary_file="ppo_summary.json",
        common_keys=("model_name_or_path", "reward_model", "dataset", "output_dir", "advantage_estimator", "batch_size",
                     "max_steps", "learning_rate", "ppo_epochs", "clip_range", "kl_coef", "gamma", "lam",
                     "max_new_tokens", "topology", "report_to"),
        # the policies' rewards come from the pipeline's one evaluation (rlhf.pipeline_eval), not from here
        figures=(("final KL", "ppo/kl"),)),
}


def check_sources(stage: Stage, parsed: tuple) -> list[str]:
    """Models and Hub datasets this stage reads, judged before anything loads (``rlhf.hub``): a missing
    path or, offline, an uncached Hub name raises ``UsageError``. Returns notes on Hub names."""
    from .data.readers import FILE_LIKE_SUFFIXES
    from .hub import check_dataset_source, check_model_source
    from .paths import is_local_path

    notes = []
    for key in stage.model_keys:
        holder = next(p for p in parsed if hasattr(p, key))
        notes.append(check_model_source(key, getattr(holder, key)))
    args = parsed[0]
    for name in (args.dataset, args.eval_dataset, getattr(args, "ptx_dataset", None)):
        if name and name != "demo" and not is_local_path(name, FILE_LIKE_SUFFIXES):
            notes.append(check_dataset_source(name))
    return [n for n in notes if n]


def stage_command(name: str, argv: list[str]) -> int:
    """``rlhf <stage> --config FILE [key=value ...]``: parse the stage's config and run it in this process."""
    import os

    import torch

    from .errors import UsageError
    from .expected_noise import quiet_cpu_runs
    from .tracking import where_runs_went

    stage = STAGES[name]
    if not argv:
        raise UsageError(f"no configuration given: rlhf {name} --config FILE [key=value ...] "
                         f"(e.g. --config configs/demo/{name}.yaml; rlhf {name} --help lists the keys)")
    if not torch.cuda.is_available():
        quiet_cpu_runs()
    parsed = stage.parse(argv)
    check_sources(stage, parsed)
    stage.run(parsed)
    if os.environ.get("RANK", "0") == "0":  # the main process of a launch
        output_dir = next(p.output_dir for p in reversed(parsed) if getattr(p, "output_dir", None))
        for line in where_runs_went(output_dir):
            print(line)
    return 0
