"""``rlhf eval``: a policy against a baseline on held-out prompts.

Both models sample a reply to every prompt with the same seed (so a model compared with itself gives
identical replies: win rate exactly 0.5, KL 0). Per model: mean reward-model score, gold reward (demo
task), KL to a reference model on the model's own samples, reply length in tokens, EOS rate, distinct-1/2
and, when the prompts come from SFT data with reference answers, BLEU (sacrebleu) and ROUGE-L
(rouge-score). Win rates of the policy over the baseline are per prompt, ties counting half.
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
from .eval import generate_responses
from .models import disable_dropout, ensure_pad_token, load_causal_lm, load_tokenizer, resolve_model_path
from .ppo.math import kl_per_token, masked_sum
from .ppo.rollout import encode_prompts, forward_response

METRICS = ("reward", "reward_normalized", "gold_reward", "kl", "response_length", "eos_rate",
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


def win_rate(a: list[float], b: list[float]) -> dict:
    """Share of prompts where a beats b, a tie counting half, with the counts behind it."""
    wins = sum(x > y for x, y in zip(a, b))
    ties = sum(x == y for x, y in zip(a, b))
    n = len(a)
    return {"win_rate": (wins + 0.5 * ties) / n if n else math.nan, "wins": wins, "ties": ties,
            "losses": n - wins - ties}


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


@torch.no_grad()
def kl_to_reference(model, ref_model, tokenizer, prompts: list[list[dict]], responses: list[list[int]],
                    temperature: float, batch_size: int = 16) -> list[float]:
    """Per prompt, sum over reply tokens of k1 = log p_model - log p_ref (temperature-scaled, as in PPO).

    ``responses`` are the sampled token ids (EOS included): decoded text does not re-encode to the same
    tokens (byte-level BPE merges, special tokens dropped), and KL is an expectation over the samples.
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = responses[start : start + batch_size]
        q_ids, q_mask, _ = encode_prompts(tokenizer, prompts[start : start + batch_size], 10**9, device)
        width = max(1, max(len(r) for r in rows))
        r_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
        r_mask = torch.zeros_like(r_ids)
        for i, r in enumerate(rows):
            r_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            r_mask[i, : len(r)] = 1
        logp, ref_logp = (forward_response(_logits_fn(m), q_ids, q_mask, r_ids, r_mask, temperature,
                                           with_values=False)[0] for m in (model, ref_model))
        out += masked_sum(kl_per_token(logp, ref_logp, "k1"), r_mask, dim=1).tolist()
    return out


def _logits_fn(model):
    return lambda ids, mask, pos, keep: model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                              logits_to_keep=keep).logits


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
        if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
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


def evaluate(policy: str, baseline: str, prompts_path: str, reward_model: str | None = None,
             reference: str | None = None, gold: bool | str = "auto", max_prompts: int | None = None,
             max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0, batch_size: int = 16,
             device: str | None = None, format: str | None = None, log=None) -> dict:
    """Every figure of the module docstring as a dict (see ``format_report``); ``log`` gets progress lines."""
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
    # the KL needs logprobs of the distribution that was sampled; greedy has none, so T = 1 stands in
    kl_temperature = temperature if temperature > 0 else 1.0
    cache: dict = {}
    ref_model, ref_tok = _load_model(reference or baseline, device, cache)
    scorer = None
    if reward_model:
        from reward_models.scoring import RewardScorer

        try:
            scorer = RewardScorer(reward_model, device=str(device))
        except (OSError, ValueError) as e:
            raise EvalInputError(f"{reward_model}: cannot load the reward model: {e}") from e

    models, per_prompt = {}, {}
    for label, name in (("policy", policy), ("baseline", baseline)):
        model, tokenizer = _load_model(name, device, cache)
        log(f"{label}: generating {len(prompts)} replies with {name}")
        gens = generate_responses(model, tokenizer, prompts, max_new_tokens, temperature, batch_size, seed)
        texts, ids = gens.responses, gens.token_ids
        m = {"model": name, "response_length": _mean(gens.lengths), "eos_rate": _mean(gens.ended_with_eos),
             "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}
        scores = {}
        if tokenizer.get_vocab() == ref_tok.get_vocab():
            scores["kl"] = kl_to_reference(model, ref_model, tokenizer, prompts, ids, kl_temperature, batch_size)
        else:  # another tokenizer: the reference cannot score these tokens
            log(f"{label}: no KL (its tokenizer differs from the reference's)")
        if scorer is not None:
            rm = scorer.score([{"prompt": p, "response": t} for p, t in zip(prompts, texts)], truncate=True,
                              batch_size=batch_size)
            scores["reward"] = [r["reward"] for r in rm]
            scores["reward_normalized"] = [r["normalized_reward"] for r in rm]
        if use_gold:
            from .data.demo_task import gold_reward

            scores["gold_reward"] = [gold_reward(p, t) for p, t in zip(prompts, texts)]
        m.update({key: _mean(values) for key, values in scores.items()})
        if references is not None:
            m["bleu"], m["rouge_l"] = bleu(texts, references), rouge_l(texts, references)
        m["samples"] = [{"prompt": p, "response": t} for p, t in zip(prompts[:3], texts[:3])]
        models[label], per_prompt[label] = m, scores
    win_rates = {key: win_rate(per_prompt["policy"][key], per_prompt["baseline"][key])
                 for key in ("reward", "gold_reward") if key in per_prompt["policy"]}
    return {
        "prompts": prompts_path, "format": report.format, "n_prompts": len(prompts),
        "references": references is not None, "reward_model": reward_model, "reference": reference or baseline,
        "gold": use_gold, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "kl_temperature": kl_temperature, "seed": seed, "models": models, "win_rate": win_rates,
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


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
        f"{'':<20}{'policy':>12}{'baseline':>12}",
    ]
    for key in METRICS:
        if key in policy or key in baseline:
            cells = "".join(f"{m[key]:>12.3f}" if key in m else f"{'-':>12}" for m in (policy, baseline))
            lines.append(f"{key:<20}{cells}")
    if result["win_rate"]:
        lines.append("win rate of policy over baseline (ties count half)")
        for key, w in result["win_rate"].items():
            lines.append(f"  by {key:<16}{w['win_rate']:>8.3f}   "
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.add_argument("--output", default=None, help="write the result as JSON to this file")
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
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
            batch_size=args.batch_size, device=args.device, format=args.format, log=print,
        )
    except (DataFormatError, EvalInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
