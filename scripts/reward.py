"""Reward-model stage entry point: ``accelerate launch scripts/reward.py --config configs/demo/reward.yaml [key=value ...]``."""

from rlhf.cli import reward_main

if __name__ == "__main__":
    reward_main()
