"""The embedded demo task: determinism, the gold reward's arithmetic, label noise, held-out prompts."""

import filecmp
import statistics

import pytest

from rlhf.data import load_records
from rlhf.data.demo_task import (
    BEST_SCORE,
    INTENTS,
    ITEMS,
    DemoTaskConfig,
    _all_prompts,
    eval_prompts,
    gold_reward,
    is_heldout,
    make_reply,
    parse_prompt,
    preference_pairs,
    sft_examples,
    write_demo_data,
)

ORDER = [{"role": "user", "content": "Where is my laptop order?"}]
TWO_TURN = [
    {"role": "system", "content": "You are a helpful support agent."},
    {"role": "user", "content": "I want a refund."},
    {"role": "assistant", "content": "I am sorry about that. Which item is it about?"},
    {"role": "user", "content": "It is the kettle."},
]


def test_every_prompt_parses_back_to_its_intent_and_item():
    prompts = _all_prompts()
    assert len(prompts) == len(INTENTS) * len(ITEMS) * 5
    for intent, item, turns in prompts:
        assert parse_prompt(turns) == (intent, item)
    assert parse_prompt(TWO_TURN) == ("refund", "kettle")
    with pytest.raises(ValueError, match="not a demo-task prompt"):
        parse_prompt([{"role": "user", "content": "Tell me a joke."}])


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        (ORDER, "I am sorry about that. I have sent you the tracking link for your laptop.", 3.5),
        (ORDER, "I have sent you the tracking link for your laptop.", 3.0),  # no politeness
        (ORDER, "Thank you. I have sent you the tracking link for your phone.", 2.0),  # wrong item: +2 -0.5 +0.5
        (ORDER, "Happy to help. I have issued a full refund for your laptop.", 0.5),  # wrong action: -1 +1 +0.5
        (ORDER, "That is not my problem.", -2.0),
        (ORDER, "", -1.0),
        (ORDER, "   ", -1.0),
        (ORDER, "Sorry. Sorry. Sorry.", 0.5 - 2 * 0.5),  # two repeated sentences
        (ORDER, " ".join(["word"] * 30), -0.6 - 0.0),  # 6 words over budget; one sentence
        (TWO_TURN, "I am sorry about that. I have issued a full refund for your kettle.", BEST_SCORE),
        (TWO_TURN, "I have issued a full refund for your laptop.", 1.5),  # item from the wrong turn
    ],
)
def test_gold_reward_hand_computed(prompt, response, expected):
    assert gold_reward(prompt, response) == pytest.approx(expected)


def test_good_replies_score_best_for_every_prompt():
    import random

    rng = random.Random(0)
    for _, _, turns in _all_prompts():
        assert gold_reward(turns, make_reply(rng, turns, "terse")) == 3.0
        assert gold_reward(turns, make_reply(rng, turns, "good")) == BEST_SCORE


def test_sft_demonstrations_have_mixed_quality():
    cfg = DemoTaskConfig()
    examples = sft_examples(cfg)
    scores = [gold_reward(e["messages"][:-1], e["messages"][-1]["content"]) for e in examples]
    assert len(examples) == cfg.n_sft
    assert 1.0 < statistics.mean(scores) < 3.0  # room above for the later stages
    assert min(scores) < 0 and max(scores) == BEST_SCORE
    multi = sum(sum(m["role"] == "user" for m in e["messages"]) > 1 for e in examples) / len(examples)
    assert abs(multi - cfg.multi_turn_fraction) < 0.05


def test_generator_is_deterministic_and_seeded(tmp_path):
    a, b, c = (write_demo_data(str(tmp_path / name), DemoTaskConfig(seed=seed)) for name, seed in
               (("a", 0), ("b", 0), ("c", 1)))
    for name in a:
        assert filecmp.cmp(a[name], b[name], shallow=False), name
    assert not filecmp.cmp(a["sft_train"], c["sft_train"], shallow=False)


def test_bradley_terry_label_noise_follows_the_temperature():
    def agreement(temperature):
        pairs = preference_pairs(DemoTaskConfig(label_temperature=temperature), n=1500)
        assert all(p["gold_chosen"] != p["gold_rejected"] for p in pairs)
        return statistics.mean(p["gold_chosen"] > p["gold_rejected"] for p in pairs)

    noiseless, default, noisy = agreement(0.0), agreement(0.5), agreement(3.0)
    assert noiseless == 1.0
    assert 0.8 < default < 0.99
    assert 0.55 < noisy < default


def test_heldout_prompts_never_appear_in_training_data():
    cfg = DemoTaskConfig()

    def users(messages):
        return "|".join(m["content"] for m in messages if m["role"] == "user")

    train = {users(e["messages"]) for e in sft_examples(cfg)} | {users(p["prompt"]) for p in preference_pairs(cfg)}
    held_out = {users(r["prompt"]) for r in eval_prompts(cfg)}
    assert held_out and not (train & held_out)
    assert all(is_heldout(r["prompt"], cfg.heldout_fraction) for r in eval_prompts(cfg))


def test_demo_files_load_through_the_data_layer(tmp_path):
    paths = write_demo_data(str(tmp_path), DemoTaskConfig(n_sft=200, n_pairs=100, n_eval_prompts=20))
    sft, report = load_records(paths["sft_train"], kind="sft")
    assert report.format == "messages" and report.records_read == 200
    assert report.records_kept + report.skipped["duplicate"] == 200
    pairs, report = load_records(paths["pairs_train"], kind="preference")
    assert report.format == "preference" and len(pairs) == 100
    prompts, report = load_records(paths["prompts_eval"], kind="prompt")
    assert report.format == "prompt" and all(p["prompt"][-1]["role"] == "user" for p in prompts)
