"""RLHF for dialogue models: SFT (TRL), reward modelling (TRL) and our own PPO on accelerate."""

__version__ = "0.1.0"
