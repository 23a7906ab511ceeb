"""Serve a reward model over HTTP: ``python scripts/serve_reward.py --model PATH [--port 0] ...``."""
import sys

from reward_models.serve import main

if __name__ == "__main__":
    sys.exit(main())
