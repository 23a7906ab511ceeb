"""The pipeline's last step: base, SFT and PPO policies evaluated in one place with one setting.

Every stage evaluates on its own terms (SFT its gold reward at its ``max_new_tokens``, PPO before and after
at its own), so their numbers do not compare. This step samples every policy on the same held-out prompts
with the same seed, length limit and temperature -- PPO's (``max_new_tokens``, ``eval_temperature``,
``eval_prompts``, ``seed``) unless the pipeline file's ``evaluation:`` section says otherwise -- and scores
them with the same reward model (``rm_reward_normalized`` and ``rm_reward_raw``), the gold reward on the demo
task, and KL to PPO's reference. The report's policy table reads only OUT/evaluation/evaluation.json.
"""

from __future__ import annotations

import dataclasses
import json
import os

import yaml

EVALUATION_KEYS = {"prompts", "max_prompts", "max_new_tokens", "temperature", "seed", "batch_size"}
RESULT = os.path.join("evaluation", "evaluation.json")


def stage_settings(spec: dict, name: str) -> dict:
    """A stage's config as it runs: the file's keys, then the pipeline's overrides (typed as YAML types them)."""
    with open(spec["stages"][name]["config"]) as f:
        settings = yaml.safe_load(f) or {}
    overrides = spec["stages"][name]["overrides"]
    return {**settings, **{k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in overrides.items()}}


def plan(spec: dict, out: str) -> dict | None:
    """(models, options) of ``rlhf.evaluation.evaluate_models``, or None when the pipeline has no PPO stage."""
    from .config import PPOConfig

    if "ppo" not in spec["stages"]:
        return None
    ppo = {f.name: f.default for f in dataclasses.fields(PPOConfig) if f.default is not dataclasses.MISSING}
    ppo.update(stage_settings(spec, "ppo"))
    chosen = dict(spec.get("evaluation") or {})  # keys checked by rlhf.pipeline.load_pipeline
    prompts = chosen.get("prompts") or ppo.get("eval_dataset")
    if not prompts and ppo.get("dataset", "demo") == "demo":
        from .data.demo_task import demo_data_paths

        prompts = demo_data_paths(ppo.get("demo_seed", 0))["prompts_eval"]
    models = {}
    if "sft" in spec["stages"]:
        models["base"] = stage_settings(spec, "sft").get("model_name_or_path")
    models["SFT"] = os.path.join(out, "sft") if "sft" in spec["stages"] else ppo["model_name_or_path"]
    models["PPO"] = os.path.join(out, "ppo")
    reward_model = os.path.join(out, "reward") if "reward" in spec["stages"] else ppo.get("reward_model")
    options = {"prompts_path": prompts, "reward_model": reward_model,
               "reference": ppo.get("ref_model") or models["SFT"],  # PPO's KL reference
               "max_prompts": chosen.get("max_prompts", ppo["eval_prompts"]),
               "max_new_tokens": chosen.get("max_new_tokens", ppo["max_new_tokens"]),
               "temperature": chosen.get("temperature", ppo["eval_temperature"]),
               "seed": chosen.get("seed", ppo["seed"]), "batch_size": chosen.get("batch_size", 16)}
    return {"models": models, "options": options}


def run(spec: dict, out: str) -> str | None:
    """Evaluate and write OUT/evaluation/{evaluation.json, generations.jsonl}; the JSON's path, or None."""
    from .evaluation import evaluate_models, write_generations

    todo = plan(spec, out)
    if todo is None:
        return None
    if not todo["options"]["prompts_path"]:
        print("evaluation: skipped, no held-out prompts (set PPO's eval_dataset or evaluation.prompts)")
        return None
    options = todo["options"]
    print(f"\n== evaluation: {', '.join(todo['models'])} on up to {options['max_prompts']} prompts of "
          f"{options['prompts_path']}, {options['max_new_tokens']} new tokens, temperature {options['temperature']}",
          flush=True)
    result = evaluate_models(todo["models"], log=print, **options)
    path = os.path.join(out, RESULT)
    write_generations(result.pop("generations"), os.path.join(os.path.dirname(path), "generations.jsonl"))
    result.pop("per_prompt")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    return path
