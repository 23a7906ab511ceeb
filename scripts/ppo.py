"""The ppo stage: ``accelerate launch scripts/ppo.py --config configs/demo/ppo.yaml [key=value ...]``.

The same as ``accelerate launch -m rlhf ppo ...`` (which needs no checkout) and, in one process, ``rlhf ppo ...``.
"""

from rlhf.cli import stage_entry

if __name__ == "__main__":
    stage_entry("ppo")
