"""Reward functions the PPO tests load by 'tests.ppo_helpers:NAME' (as users load their own)."""

import os

_calls = {"n": 0}


def constant_zero(prompt, response):
    return 0.0


def length_reward(prompt, response):
    """Longer replies score higher: easy to climb, for smoke tests."""
    return len(response.split()) / 10


def nan_after_calls(prompt, response):
    """Finite rewards for the first $NAN_AFTER calls, then NaN: drives the non-finite guard."""
    _calls["n"] += 1
    return float("nan") if _calls["n"] > int(os.environ.get("NAN_AFTER", "16")) else 0.5


def length_rewards(prompts, responses, **columns):
    """The batched signature: one word-count reward per reply."""
    return [len(r.split()) / 10 for r in responses]


def answer_match(prompts, responses, answer, **columns):
    """A verifier reading a dataset column: 1 when the reply contains the prompt record's `answer`."""
    return [float(a is not None and str(a) in r) for r, a in zip(responses, answer)]


def always_fails(prompts, responses, **columns):
    raise ConnectionError("the verifier service is down")
