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
