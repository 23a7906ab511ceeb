"""Evaluating policies on held-out prompts: the figures every stage reports, and the ``rlhf eval`` command.

``reply_figures`` is where sampled replies become figures (reward, gold reward, KL to a reference,
length, EOS rate); PPO's before/after evaluation, SFT's gold evaluation and ``rlhf eval`` all use it,
after sampling through ``rlhf.generation``.

``rlhf eval``: both models sample a reply to every prompt with the same seed (so a model compared with
itself gives identical replies: win rate exactly 0.5, KL 0). Per model: mean reward (the reward model's
normalized score, as PPO uses it: ``rm_reward_normalized``; and its raw score, ``rm_reward_raw``), gold reward (demo task), KL to a reference model on the model's own
samples, reply length in tokens, EOS rate, distinct-1/2 and, when the prompts come from SFT data with
reference answers, BLEU (sacrebleu) and ROUGE-L (rouge-score). Win rates of the policy over the
baseline are per prompt, ties counting half, with a 95% Wilson interval. ``--output-dir`` gets the
result (``eval.json``) and every reply side by side (``generations.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

from .data import DataFormatError, load_records, prompt_of
from .data.formats import CONVERTERS
from .generation import Generations, Sampling, encode_prompts, generate_replies, stop_token_ids
from .models import disable_dropout, ensure_pad_token, load_causal_lm, load_tokenizer, resolve_model_path
from .paths import is_local_path
from .ppo.kl import kl_per_token
from .ppo.masked import masked_sum
from .ppo.rollout import forward_response
from .tensors import pad_rows

# one name per quantity, the same in `rlhf eval`, the pipeline's evaluation and its report
RM_NORMALIZED, RM_RAW = "rm_reward_normalized", "rm_reward_raw"
METRICS = (RM_NORMALIZED, RM_RAW, "gold_reward", "kl", "response_length", "eos_rate",
           "distinct_1", "distinct_2", "bleu", "rouge_l")
_TOKENS = re.compile(r"\w+|[^\w\s]")  # words and punctuation marks: model-independent, so models compare


class EvalInputError(ValueError):
    """A model or option that cannot be used; main() prints it without a traceback, like DataFormatError."""


# ---------------------------------------------------------------------------------------------
# metrics on texts and scores


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams over every reply of one model (Li et al. 2016); 0 when there are none."""
    grams = [tuple(words[i : i + n]) for words in (_TOKENS.findall(t) for t in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


WIN_RATE_KEYS = (RM_NORMALIZED, "gold_reward")  # the raw RM score ranks replies as the normalized one does


def win_rate(a: list[float], b: list[float]) -> dict:
    """Share of prompts where a beats b, a tie counting half, with the counts behind it and a 95% Wilson
    interval (Wilson 1927) on that share over the n prompts (ties as half a win)."""
    wins = sum(x > y for x, y in zip(a, b))
    ties = sum(x == y for x, y in zip(a, b))
    n = len(a)
    low, high = wilson_interval(wins + 0.5 * ties, n)
    return {"win_rate": (wins + 0.5 * ties) / n if n else math.nan, "wins": wins, "ties": ties,
            "losses": n - wins - ties, "ci95": [low, high]}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for the default z); (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (0..100, default 13a tokenisation), one reference per reply."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (0..1, rouge-score with Porter stemming).

    rouge-score's tokenizer keeps only [a-z0-9]: text in other scripts scores 0.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return sum(scores) / len(scores) if scores else math.nan


def logits_fn(model):
    """``(ids, mask, positions, logits_to_keep) -> logits`` of a transformers causal LM."""
    return lambda ids, mask, pos, keep: model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                              logits_to_keep=keep).logits


@torch.no_grad()
def sequence_kl(policy_fn, ref_fn, tokenizer, gens: Generations, temperature: float,
                max_prompt_length: int | None = None, batch_size: int = 16, device=None) -> list[float]:
    """Per reply, the sum over its tokens of k1 = log p_policy - log p_ref, as PPO logs it.

    The sampled token ids are scored, not re-encoded text (decoding and re-encoding may give other tokens,
    and KL is an expectation over the samples), at the sampling temperature; greedy replies have no
    sampling distribution, so T = 1 stands in.
    """
    temperature = temperature if temperature > 0 else 1.0
    out = []
    for start in range(0, len(gens.prompts), batch_size):
        rows = gens.token_ids[start : start + batch_size]
        q_ids, q_mask, _ = encode_prompts(tokenizer, gens.prompts[start : start + batch_size], max_prompt_length,
                                          device)
        r_ids, r_mask = pad_rows(rows, tokenizer.pad_token_id, width=1, device=device)
        logp, ref_logp = (forward_response(fn, q_ids, q_mask, r_ids, r_mask, temperature, with_values=False)[0]
                          for fn in (policy_fn, ref_fn))
        out += masked_sum(kl_per_token(logp, ref_logp, "k1"), r_mask, dim=1).tolist()
    return out


def reply_figures(gens: Generations, sources: dict, kl: list[float] | None = None,
                  columns: dict | None = None) -> dict[str, list[float]]:
    """Per-reply figures: length (tokens, stop included), EOS rate (0/1), KL, and one per reward source
    (``name -> (prompts, responses, **columns) -> list[float]``, e.g. ``reward`` and ``gold_reward``)."""
    figures = {"response_length": [float(n) for n in gens.lengths], "eos_rate": [float(s) for s in gens.has_stop]}
    for name, source in sources.items():
        figures[name] = [float(x) for x in source(gens.prompts, gens.responses, **(columns or {}))]
    if kl is not None:
        figures["kl"] = list(kl)
    return figures


def means(figures: dict[str, list[float]]) -> dict[str, float]:
    return {key: sum(values) / len(values) if values else math.nan for key, values in figures.items()}


# ---------------------------------------------------------------------------------------------
# inputs


def load_eval_prompts(path: str, format: str | None = None) -> tuple[list[list[dict]], list[str] | None, object]:
    """(prompts, reference answers or None, load report) from a file of any supported format.

    Loading as prompts first validates the file whatever it holds; SFT data is then loaded again to keep
    each record's last assistant reply as the reference for its prompt.
    """
    records, report = load_records(path, format=format, kind="prompt")
    if CONVERTERS[report.format][0] != "sft":
        return [r["prompt"] for r in records], None, report
    records, report = load_records(path, format=format, kind="sft")
    prompts, references = [], []
    for r in records:
        prompt = prompt_of(r)
        # the prompt loader's rule: the prompt ends on a user turn and a reply follows it
        if prompt and prompt[-1]["role"] == "user" and len(prompt) < len(r["messages"]):
            prompts.append(prompt)
            references.append(r["messages"][len(prompt)]["content"])
    if not prompts:
        raise DataFormatError([f"{path}: no record has a prompt ending on a user turn"])
    return prompts, references, report


def is_demo_prompt(prompt: list[dict]) -> bool:
    from .data.demo_task import parse_prompt

    try:
        parse_prompt(prompt)
    except ValueError:
        return False
    return True


def _load_model(name: str, device, cache: dict):
    """(model, tokenizer), loaded once per resolved path: a model named twice (A = B, reference = B) is shared."""
    try:
        path = resolve_model_path(name)
        if is_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
            raise OSError("no such model directory")  # transformers would call it an invalid Hub id
        if path not in cache:
            tokenizer = load_tokenizer(path)
            model = load_causal_lm(path)
            ensure_pad_token(tokenizer, model)
            disable_dropout(model)
            cache[path] = (model.to(device), tokenizer)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"{name}: cannot load the model: {e}") from e
    return cache[path]


# ---------------------------------------------------------------------------------------------
# the evaluation


def evaluate_models(models: dict[str, str], prompts_path: str, reward_model: str | None = None,
                    reference: str | None = None, gold: bool | str = "auto", max_prompts: int | None = None,
                    max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    stop_tokens: list[str] | None = None, seed: int = 0, batch_size: int = 16,
                    device: str | None = None, format: str | None = None, log=None) -> dict:
    """Every model of ``models`` (label -> name) on the same prompts with the same sampling: the settings,
    per-model means (``models``), per-reply figures (``per_prompt``) and the replies side by side
    (``generations``, one row per prompt). ``reference`` (default: the first model) is the KL reference."""
    log = log or (lambda line: None)
    prompts, references, report = load_eval_prompts(prompts_path, format)
    if max_prompts:
        prompts, references = prompts[:max_prompts], references and references[:max_prompts]
    for line in report.summary_lines():
        log(line)
    gold = {"on": True, "off": False}.get(gold, gold) if isinstance(gold, str) else gold
    demo = all(is_demo_prompt(p) for p in prompts)
    if gold is True and not demo:
        bad = next(i for i, p in enumerate(prompts) if not is_demo_prompt(p))
        raise DataFormatError([f"{prompts_path}: prompt {bad + 1} is not a demo-task prompt; the gold reward "
                               "exists only for the demo task"])
    use_gold = demo if gold == "auto" else bool(gold)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cache: dict = {}
    reference = reference or next(iter(models.values()))
    ref_model, ref_tok = _load_model(reference, device, cache)
    sources = {}
    if reward_model:
        from .ppo.rewards import LocalRewardModel

        try:
            scorer = LocalRewardModel(reward_model, device=device, batch_size=batch_size)
        except (OSError, ValueError) as e:
            raise EvalInputError(f"{reward_model}: cannot load the reward model: {e}") from e
        sources[RM_NORMALIZED] = scorer
        sources[RM_RAW] = lambda prompts, responses, **_: scorer.last_raw  # the same call's raw scores
    if use_gold:
        from .ppo.rewards import load_function

        sources["gold_reward"] = load_function("gold")

    figures_of, per_prompt = {}, {}
    rows = [{"prompt": p, **({"reference": r} if references else {})}
            for p, r in zip(prompts, references or [None] * len(prompts))]
    for label, name in models.items():
        model, tokenizer = _load_model(name, device, cache)
        log(f"{label}: generating {len(prompts)} replies with {name}")
        try:
            sampling = Sampling(max_new_tokens, temperature, top_p, top_k, stop_token_ids(tokenizer, stop_tokens))
        except ValueError as e:
            raise EvalInputError(f"{name}: {e}") from e
        gens = generate_replies(model, tokenizer, prompts, sampling, batch_size, seed, progress=f"{label}: generating")
        kl = None
        if tokenizer.get_vocab() == ref_tok.get_vocab():
            kl = sequence_kl(logits_fn(model), logits_fn(ref_model), tokenizer, gens, temperature,
                             batch_size=batch_size, device=device)
        else:  # another tokenizer: the reference cannot score these tokens
            log(f"{label}: no KL (its tokenizer differs from the reference's)")
        figures = reply_figures(gens, sources, kl)
        m = {"model": name, **means(figures), "distinct_1": distinct_n(gens.responses, 1),
             "distinct_2": distinct_n(gens.responses, 2)}
        if references is not None:
            m["bleu"], m["rouge_l"] = bleu(gens.responses, references), rouge_l(gens.responses, references)
        m["samples"] = [{"prompt": p, "response": t} for p, t in zip(prompts[:3], gens.responses[:3])]
        figures_of[label], per_prompt[label] = m, figures
        for i, row in enumerate(rows):
            row[label] = {"response": gens.responses[i], **{k: v[i] for k, v in figures.items()}}
    return {
        "prompts": prompts_path, "format": report.format, "n_prompts": len(prompts),
        "references": references is not None, "reward_model": reward_model, "reference": reference,
        "gold": use_gold, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
        "top_k": top_k, "kl_temperature": temperature if temperature > 0 else 1.0, "seed": seed,
        "models": figures_of, "per_prompt": per_prompt, "generations": rows,
    }


def evaluate(policy: str, baseline: str, prompts_path: str, reference: str | None = None, **options) -> dict:
    """``rlhf eval``: the policy and the baseline (the default KL reference) by ``evaluate_models``, with
    the policy's win rates over the baseline."""
    result = evaluate_models({"policy": policy, "baseline": baseline}, prompts_path, reference=reference or baseline,
                             **options)
    per_prompt = result.pop("per_prompt")
    result["win_rate"] = {key: win_rate(per_prompt["policy"][key], per_prompt["baseline"][key])
                          for key in WIN_RATE_KEYS if key in per_prompt["policy"]}
    return result


def write_generations(rows: list[dict], path: str) -> str:
    """The replies side by side, one JSON line per prompt: ``{prompt, [reference], LABEL: {response, figures}}``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def format_report(result: dict) -> str:
    """A table with a column per model, then the win rates of the policy over the baseline."""
    policy, baseline = result["models"]["policy"], result["models"]["baseline"]
    lines = [
        f"{result['n_prompts']} prompts from {result['prompts']} (format {result['format']}), "
        f"temperature {result['temperature']}, up to {result['max_new_tokens']} new tokens, seed {result['seed']}",
        f"policy   = {policy['model']}",
        f"baseline = {baseline['model']}",
        f"KL to {result['reference']} (k1, summed over reply tokens, T={result['kl_temperature']})"
        + (f"; reward model {result['reward_model']}" if result["reward_model"] else ""),
        f"{'':<22}{'policy':>12}{'baseline':>12}",
    ]
    for key in METRICS:
        if key in policy or key in baseline:
            cells = "".join(f"{m[key]:>12.3f}" if key in m else f"{'-':>12}" for m in (policy, baseline))
            lines.append(f"{key:<22}{cells}")
    if result["win_rate"]:
        lines.append("win rate of policy over baseline (ties count half)")
        for key, w in result["win_rate"].items():
            low, high = w["ci95"]
            lines.append(f"  by {key:<22}{w['win_rate']:>7.3f}  95% CI [{low:.3f}, {high:.3f}]  "
                         f"(wins {w['wins']}, ties {w['ties']}, losses {w['losses']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf eval", allow_abbrev=False,
                                description="Compare a policy with a baseline on held-out prompts.")
    p.add_argument("--policy", required=True, help="model A: Hub id, directory, or tiny:demo")
    p.add_argument("--baseline", required=True, help="model B")
    p.add_argument("--prompts", required=True, help="prompts in any supported format (SFT data: with references)")
    p.add_argument("--format", default="auto", help="override format detection")
    p.add_argument("--reward-model", default=None, help="sequence-classification reward model")
    p.add_argument("--reference", default=None, help="KL reference model (default: the baseline)")
    p.add_argument("--gold", choices=("auto", "on", "off"), default="auto",
                   help="demo-task gold reward (auto: when every prompt is a demo-task prompt)")
    p.add_argument("--max-prompts", type=int, default=None, help="evaluate the first N prompts (default all)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--stop-tokens", nargs="+", default=None, help="tokens that end a reply (default: EOS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.add_argument("--output", default=None, help="write the result as JSON to this file")
    p.add_argument("--output-dir", default="runs/eval", help="gets eval.json and the replies side by side "
                   "(generations.jsonl)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    counts = (args.max_new_tokens, args.batch_size) + ((args.max_prompts,) if args.max_prompts is not None else ())
    if args.temperature < 0 or min(counts) < 1:
        print("error: --temperature must be >= 0; --max-new-tokens, --batch-size, --max-prompts >= 1",
              file=sys.stderr)
        return 2
    try:
        result = evaluate(
            args.policy, args.baseline, args.prompts, reward_model=args.reward_model, reference=args.reference,
            gold=args.gold, max_prompts=args.max_prompts,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            stop_tokens=args.stop_tokens, seed=args.seed,
            batch_size=args.batch_size, device=args.device, format=args.format, log=print,
        )
    except (DataFormatError, EvalInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    generations = result.pop("generations")
    print(format_report(result))
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    print(f"replies side by side: {write_generations(generations, os.path.join(args.output_dir, 'generations.jsonl'))}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
