"""PPO stage entry point: ``accelerate launch scripts/ppo.py --config configs/demo/ppo.yaml [key=value ...]``."""

from rlhf.cli import ppo_main

if __name__ == "__main__":
    ppo_main()
