"""SFT stage entry point: ``accelerate launch scripts/sft.py --config configs/demo/sft.yaml [key=value ...]``."""

from rlhf.cli import sft_main

if __name__ == "__main__":
    sft_main()
