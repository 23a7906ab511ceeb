"""The ``rlhf`` command: ``rlhf --help`` lists the subcommands, ``rlhf COMMAND --help`` each one's options.

Every subcommand is a ``main(argv) -> int`` in the module that owns it; this file only dispatches. The
training stages (``rlhf sft|reward|ppo``) run in this process; under ``accelerate launch -m rlhf
<stage> ...`` they run on every process of the launch (that is what ``rlhf pipeline`` does).
"""

from __future__ import annotations

import importlib
import os
import sys

from .stages import STAGES

# name -> (one-line help, "module:function" taking argv and returning an exit status)
COMMANDS = {
    **{name: (stage.help, "rlhf.stages:stage_command") for name, stage in STAGES.items()},
    "pipeline": ("SFT -> reward -> PPO from a pipeline YAML, then a report (--dry-run to validate)",
                 "rlhf.pipeline:main"),
    "demo": ("the pipeline on the embedded demo task (configs/demo/pipeline.yaml)", "rlhf.pipeline:demo_main"),
    "data": ("inspect and validate data files (rlhf data inspect FILE ...)", "rlhf.data.inspect:main"),
    "eval": ("compare a policy with a baseline on held-out prompts (RM, gold, KL, distinct-n, BLEU)",
             "rlhf.evaluation:main"),
    "eval-rm": ("evaluate a reward model on preference pairs (accuracy, margins, calibration)",
                "reward_models.evaluation:main"),
    "serve": ("reward-model scoring API over HTTP (same as scripts/serve_reward.py)", "reward_models.serve:main"),
    "models": ("checkpoints: rlhf models import FILE.gguf --out DIR (a standard model directory)",
               "rlhf.model_import:main"),
    "estimate-memory": ("memory per device for a model, stage and method (no weights downloaded)",
                        "rlhf.memory_command:main"),
    "chat": ("talk to a trained model: rlhf chat --model DIR (multi-turn over stdin)", "rlhf.chat:main"),
    "export": ("merge a LoRA adapter into a standard model: rlhf export --adapter DIR --out DIR",
               "rlhf.chat:export_main"),
    "env": ("versions and devices, for bug reports", "rlhf.chat:env_main"),
}

# commands that never ask the Hub: no probe
OFFLINE_COMMANDS = {"data", "env", "export"}  # export probes only to push


def usage() -> str:
    from . import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: rlhf COMMAND [ARGS ...]   (rlhf {__version__})", "",
             "SFT -> reward model -> PPO for dialogue models.", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (help_, _) in COMMANDS.items()]
    lines += ["", "rlhf COMMAND --help shows a command's options; stages take --config FILE and key=value overrides."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"rlhf {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"rlhf: unknown command {argv[0]!r}{hint} (rlhf --help lists them)", file=sys.stderr)
        return 2
    from .errors import UsageError, report

    if argv[0] not in OFFLINE_COMMANDS and not {"-h", "--help"} & set(argv):
        from .hub import hub_offline

        hub_offline()  # probed once, before any Hub request can start retrying
    module, _, function = COMMANDS[argv[0]][1].partition(":")
    try:
        command = getattr(importlib.import_module(module), function)
        result = command(argv[0], argv[1:]) if argv[0] in STAGES else command(argv[1:])
    except UsageError as e:
        return report(f"rlhf {argv[0]}", e)
    return result if isinstance(result, int) else 0


def entry() -> int:
    """Console-script entry: a closed pipe (``rlhf data inspect F | head``) ends quietly."""
    try:
        return main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def stage_entry(name: str) -> None:
    """What ``scripts/<stage>.py`` runs: the stage with this process's command-line arguments."""
    sys.exit(main([name, *sys.argv[1:]]))
