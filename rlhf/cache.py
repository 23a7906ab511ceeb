"""Where built artefacts (the tiny demo model, generated demo data) are cached: ``$RLHF_HOME``."""

import os


def rlhf_home() -> str:
    return os.environ.get("RLHF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "rlhf"))
