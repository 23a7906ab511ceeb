"""The reward stage: ``accelerate launch scripts/reward.py --config configs/demo/reward.yaml [key=value ...]``.

The same as ``accelerate launch -m rlhf reward ...`` (which needs no checkout) and, in one process, ``rlhf reward ...``.
"""

from rlhf.cli import stage_entry

if __name__ == "__main__":
    stage_entry("reward")
