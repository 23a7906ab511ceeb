"""The embedded demo task: a small customer-support dialogue domain with a programmatic gold reward.

A user asks for help with an item (track, refund, replace, cancel or exchange it), in one turn or
over two (the item is named only in the second user turn, so the reply must use the whole dialogue).
A *good* reply apologises or thanks, names the item, states the right action in few words and stops.
The gold reward (``gold_reward``) scores any reply text against the prompt:

    +2.0  the correct action phrase for the request        (-1.0 for each other action's phrase)
    +1.0  the requested item is named                       (-0.5 for each other item named)
    +0.5  polite (sorry / thank you / happy to help)        (-2.0 if rude)
    -0.1  per word beyond 24 words,  -0.5 per repeated sentence,  -1.0 if the reply is empty

so the best reply scores 3.5. SFT demonstrations mix good replies with generic, wrong, rude and
rambling ones (``DemoTaskConfig.quality_mix``), so a policy that imitates them has room to improve.
Preference labels follow Bradley-Terry on the gold reward: P(a preferred) = sigmoid((g_a - g_b) / T)
with T = ``label_temperature`` (T -> 0: noiseless labels). Prompts are split into train and held-out by
a hash of their text, so held-out prompts are never seen in training.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field, replace

from .readers import write_jsonl

ITEMS = ["laptop", "phone", "blender", "lamp", "camera", "jacket", "kettle", "headphones", "printer", "backpack",
         "watch", "tablet", "chair", "toaster", "speaker", "bicycle"]

# intent -> (single-turn requests with {item}, first turns of a two-turn request, action sentence)
INTENTS = {
    "track": (
        ["where is my {item} order", "my {item} has not arrived yet", "when will my {item} be delivered"],
        ["my order has not arrived yet", "where is my package"],
        "I have sent you the tracking link for your {item}.",
    ),
    "refund": (
        ["I want a refund for my {item}", "can I get my money back for the {item}", "please refund the {item}"],
        ["I would like my money back", "I want a refund"],
        "I have issued a full refund for your {item}.",
    ),
    "replace": (
        ["my {item} arrived broken", "the {item} I received is damaged", "my new {item} does not work"],
        ["something I ordered arrived broken", "my delivery came damaged"],
        "I will ship a free replacement {item} today.",
    ),
    "cancel": (
        ["please cancel my {item} order", "I no longer want the {item} I ordered", "stop my {item} order"],
        ["I need to cancel an order", "please cancel my order"],
        "I have cancelled your {item} order.",
    ),
    "exchange": (
        ["can I swap my {item} for another color", "the {item} is the wrong size", "I want a different {item} model"],
        ["I want to exchange something", "can I swap an item"],
        "I have set up an exchange for your {item}.",
    ),
}
ACTION_PHRASES = {
    "track": "tracking link", "refund": "full refund", "replace": "free replacement",
    "cancel": "cancelled your", "exchange": "an exchange",
}
POLITE = ["I am sorry about that.", "Thank you for reaching out.", "Happy to help."]
POLITE_WORDS = ("sorry", "thank you", "happy to help")
RUDE = ["That is not my problem.", "Stop asking me this.", "Read the manual."]
RUDE_WORDS = ("not my problem", "stop asking", "read the manual")
GENERIC = ["Please contact our support team.", "I can not help with that.", "Please check our website."]
CLOSINGS = ["Anything else?", "Have a nice day.", "Let me know if you need more."]
FILLER = ["Let me know if you need more.", "We value you as a customer.", "Our team works hard every day."]
ASK_ITEM = "Which item is it about?"
SYSTEM_PROMPTS = ["You are a helpful support agent.", "You answer customer questions for a shop."]
WORD_BUDGET = 24
BEST_SCORE = 3.5


@dataclass
class DemoTaskConfig:
    seed: int = 0
    n_sft: int = 2000
    n_pairs: int = 2000
    n_eval_prompts: int = 128
    multi_turn_fraction: float = 0.3
    system_prompt_fraction: float = 0.2
    heldout_fraction: float = 0.15  # share of the prompt space reserved for evaluation
    label_temperature: float = 0.5  # Bradley-Terry temperature of preference labels (0: noiseless)
    # reply kinds in SFT demonstrations and their weights
    quality_mix: dict = field(default_factory=lambda: {
        "good": 0.35, "terse": 0.15, "generic": 0.15, "wrong_action": 0.1, "wrong_item": 0.1,
        "rude": 0.05, "rambling": 0.1,
    })


# ---------------------------------------------------------------------------------------------
# prompts


def _all_prompts() -> list[tuple[str, str, list[dict]]]:
    """Every (intent, item, user turns) the task can ask, without system prompts."""
    prompts = []
    for intent, (single, openers, _) in INTENTS.items():
        for item in ITEMS:
            for request in single:
                prompts.append((intent, item, [{"role": "user", "content": _sentence(request.format(item=item))}]))
            for opener in openers:
                prompts.append((intent, item, [
                    {"role": "user", "content": _sentence(opener)},
                    {"role": "assistant", "content": f"{POLITE[0]} {ASK_ITEM}"},
                    {"role": "user", "content": f"It is the {item}."},
                ]))
    return prompts


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("?" if text.split()[0] in ("where", "when", "can") else ".")


def is_heldout(messages: list[dict], fraction: float) -> bool:
    """Held-out membership by a hash of the user turns (independent of seed and system prompt)."""
    text = "|".join(m["content"] for m in messages if m["role"] == "user")
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def sample_prompts(rng: random.Random, n: int, cfg: DemoTaskConfig, heldout: bool) -> list[list[dict]]:
    pool = [p for p in _all_prompts() if is_heldout(p[2], cfg.heldout_fraction) == heldout]
    single = [p for p in pool if len(p[2]) == 1]
    multi = [p for p in pool if len(p[2]) > 1]
    out = []
    for _ in range(n):
        _, _, turns = rng.choice(multi if rng.random() < cfg.multi_turn_fraction else single)
        messages = [dict(m) for m in turns]
        if rng.random() < cfg.system_prompt_fraction:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        out.append(messages)
    return out


# ---------------------------------------------------------------------------------------------
# parsing a prompt back into (intent, item): the gold reward depends on the dialogue text only

def _request_pattern(template: str) -> re.Pattern:
    before, _, after = _sentence(template).partition("{item}")
    return re.compile(re.escape(before) + (r"(?P<item>\w+)" + re.escape(after) if _ else "") + "$")


_REQUEST_PATTERNS = [
    (intent, _request_pattern(t))
    for intent, (single, openers, _) in INTENTS.items()
    for t in single + openers
]
_ITEM_TURN = re.compile(r"^It is the (?P<item>\w+)\.$")


def parse_prompt(messages: list[dict]) -> tuple[str, str]:
    """(intent, item) of a demo prompt; ``ValueError`` for a prompt the demo task did not generate."""
    intent = item = None
    for m in messages:
        if m["role"] != "user":
            continue
        text = m["content"].strip()
        for candidate, pattern in _REQUEST_PATTERNS:
            match = pattern.match(text)
            if match:
                intent = candidate
                item = match.groupdict().get("item") or item
                break
        else:
            match = _ITEM_TURN.match(text)
            if match:
                item = match["item"]
    if intent is None or item not in ITEMS:
        raise ValueError(f"not a demo-task prompt: {[m['content'] for m in messages]!r}")
    return intent, item


# ---------------------------------------------------------------------------------------------
# gold reward


def gold_reward(prompt: list[dict], response: str) -> float:
    """The task's true reward for ``response`` to ``prompt`` (see the module docstring)."""
    intent, item = parse_prompt(prompt)
    text = response.lower()
    words = re.findall(r"[a-z']+", text)
    if not words:
        return -1.0
    score = 0.0
    for other, phrase in ACTION_PHRASES.items():
        if phrase in text:
            score += 2.0 if other == intent else -1.0
    for other in ITEMS:
        if re.search(rf"\b{other}\b", text):
            score += 1.0 if other == item else -0.5
    if any(w in text for w in POLITE_WORDS):
        score += 0.5
    if any(w in text for w in RUDE_WORDS):
        score -= 2.0
    score -= 0.1 * max(0, len(words) - WORD_BUDGET)
    sentences = [s.strip() for s in re.split(r"[.!?]+", text) if s.strip()]
    score -= 0.5 * (len(sentences) - len(set(sentences)))
    return round(score, 4)


def gold_rewards(prompts: list[list[dict]], responses: list[str], **columns) -> list[float]:
    """``gold_reward`` over a batch: the signature of every reward source (``reward_function: gold``)."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


# ---------------------------------------------------------------------------------------------
# replies of each quality


def make_reply(rng: random.Random, prompt: list[dict], kind: str) -> str:
    intent, item = parse_prompt(prompt)
    action = INTENTS[intent][2].format(item=item)
    if kind == "good":
        parts = [rng.choice(POLITE), action] + ([rng.choice(CLOSINGS)] if rng.random() < 0.5 else [])
    elif kind == "terse":
        parts = [action]
    elif kind == "generic":
        parts = [rng.choice(POLITE)] * (rng.random() < 0.5) + [rng.choice(GENERIC)]
    elif kind == "wrong_action":
        other = rng.choice([i for i in INTENTS if i != intent])
        parts = [rng.choice(POLITE), INTENTS[other][2].format(item=item)]
    elif kind == "wrong_item":
        parts = [rng.choice(POLITE), INTENTS[intent][2].format(item=rng.choice([i for i in ITEMS if i != item]))]
    elif kind == "rude":
        parts = [rng.choice(RUDE)] + [rng.choice(GENERIC)] * (rng.random() < 0.5)
    elif kind == "rambling":
        parts = [rng.choice(POLITE), action] + [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
    else:
        raise ValueError(f"unknown reply kind {kind!r}")
    return " ".join(parts)


def _kind(rng: random.Random, cfg: DemoTaskConfig) -> str:
    kinds, weights = zip(*cfg.quality_mix.items())
    return rng.choices(kinds, weights=weights)[0]


def sft_examples(cfg: DemoTaskConfig, heldout: bool = False, n: int | None = None) -> list[dict]:
    rng = random.Random(f"sft:{cfg.seed}:{heldout}")
    return [
        {"messages": p + [{"role": "assistant", "content": make_reply(rng, p, _kind(rng, cfg))}]}
        for p in sample_prompts(rng, n or cfg.n_sft, cfg, heldout)
    ]


def preference_pairs(cfg: DemoTaskConfig, heldout: bool = False, n: int | None = None) -> list[dict]:
    """Pairs of two different replies with a Bradley-Terry label sampled from the gold reward.

    Each record keeps both gold rewards (``gold_chosen``/``gold_rejected``) so accuracy can be measured
    against the noiseless gold order; pairs of equal gold reward are not generated.
    """
    rng = random.Random(f"pairs:{cfg.seed}:{heldout}")
    pairs = []
    prompts = iter(sample_prompts(rng, 10 * (n or cfg.n_pairs), cfg, heldout))
    while len(pairs) < (n or cfg.n_pairs):
        prompt = next(prompts)
        a, b = (make_reply(rng, prompt, rng.choice(list(cfg.quality_mix))) for _ in range(2))
        ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
        if ga == gb:
            continue
        p_a = 1.0 if (cfg.label_temperature == 0 and ga > gb) else (
            0.0 if cfg.label_temperature == 0 else 1 / (1 + math.exp(-(ga - gb) / cfg.label_temperature)))
        if rng.random() >= p_a:
            a, b, ga, gb = b, a, gb, ga
        pairs.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": b}],
            "gold_chosen": ga, "gold_rejected": gb,
        })
    return pairs


def eval_prompts(cfg: DemoTaskConfig) -> list[dict]:
    rng = random.Random(f"eval:{cfg.seed}")
    return [{"prompt": p} for p in sample_prompts(rng, cfg.n_eval_prompts, cfg, heldout=True)]


def corpus(cfg: DemoTaskConfig) -> list[str]:
    """Every text the task can produce, for training the tiny tokenizer."""
    rng = random.Random(f"corpus:{cfg.seed}")
    texts = []
    for _, _, turns in _all_prompts():
        texts += [m["content"] for m in turns]
        texts += [make_reply(rng, turns, kind) for kind in cfg.quality_mix]
    texts += SYSTEM_PROMPTS + POLITE + RUDE + GENERIC + CLOSINGS + FILLER
    return texts


def demo_data_paths(seed: int = 0) -> dict[str, str]:
    """The demo files for ``seed``, generated once under ``$RLHF_HOME`` (atomically)."""
    from ..paths import rlhf_home

    out_dir = os.path.join(rlhf_home(), f"demo-data-seed{seed}")
    if not os.path.exists(os.path.join(out_dir, "task_config.jsonl")):
        tmp = f"{out_dir}.tmp{os.getpid()}"
        write_demo_data(tmp, DemoTaskConfig(seed=seed))
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process won the race; its files are identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return {name: os.path.join(out_dir, filename) for name, filename in DEMO_FILES.items()}


DEMO_FILES = {
    "sft_train": "sft_train.jsonl", "sft_eval": "sft_eval.jsonl", "pairs_train": "preferences_train.jsonl",
    "pairs_eval": "preferences_eval.jsonl", "prompts_eval": "prompts_eval.jsonl",
}


def write_demo_data(out_dir: str, cfg: DemoTaskConfig | None = None) -> dict[str, str]:
    """Write the demo files in the standard formats the data layer reads; returns name -> path."""
    cfg = cfg or DemoTaskConfig()
    records = {
        "sft_train": sft_examples(cfg),
        "sft_eval": sft_examples(cfg, heldout=True, n=max(64, cfg.n_sft // 10)),
        "pairs_train": preference_pairs(cfg),
        # held-out pairs carry the noiseless gold order: accuracy on them is accuracy against the gold reward
        "pairs_eval": preference_pairs(replace(cfg, label_temperature=0.0), heldout=True, n=max(200, cfg.n_pairs // 5)),
        "prompts_eval": eval_prompts(cfg),
    }
    paths = {}
    for name, filename in DEMO_FILES.items():
        paths[name] = os.path.join(out_dir, filename)
        write_jsonl(paths[name], records[name])
    write_jsonl(os.path.join(out_dir, "task_config.jsonl"), [asdict(cfg)])
    return paths
