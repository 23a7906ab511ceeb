"""The sft stage: ``accelerate launch scripts/sft.py --config configs/demo/sft.yaml [key=value ...]``.

The same as ``accelerate launch -m rlhf sft ...`` (which needs no checkout) and, in one process, ``rlhf sft ...``.
"""

from rlhf.cli import stage_entry

if __name__ == "__main__":
    stage_entry("sft")
