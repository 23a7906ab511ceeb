"""The reward side: reward-model training, the one scoring path, and the scoring API."""
