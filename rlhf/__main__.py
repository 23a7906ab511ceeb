"""``python -m rlhf ...`` is the ``rlhf`` command; stages run as ``accelerate launch -m rlhf <stage> ...``."""

import sys

from .cli import entry

sys.exit(entry())
