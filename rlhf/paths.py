"""Where things are: a local path or a Hub id, the configs shipped with the package, the build cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def is_local_path(name: str | os.PathLike, file_suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` means a path on this machine rather than a Hub id (``name`` or ``owner/name``).

    It exists, or it is written as a path (``/``, ``./``, ``~``, two or more ``/``), or it ends in a
    file suffix no Hub id carries: a missing path is then reported as missing, not sent to the Hub.
    """
    name = os.fspath(name)
    return (
        os.path.exists(os.path.expanduser(name))
        or name.startswith(("/", "./", "../", "~", "\\", "."))
        or name.count("/") > 1
        or name.lower().endswith(file_suffixes)
    )


def configs_root() -> Path:
    """The shipped configs: ``rlhf/configs`` in an installed wheel, the checkout's ``configs/`` otherwise."""
    packaged = PACKAGE_DIR / "configs"
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / "configs"


def resolve_config(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """A config file by path (as given, then relative to ``base``), else by its name among the shipped
    configs: ``demo/ppo.yaml`` (or ``configs/demo/ppo.yaml``) works from any directory and after
    ``pip install``."""
    path = os.path.expanduser(os.fspath(path))
    shipped = path[len("configs/"):] if path.startswith("configs/") else path
    candidates = [path] + ([os.path.join(base, path)] if base else []) + [str(configs_root() / shipped)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f"{path}: no such config file (looked in: {', '.join(dict.fromkeys(candidates))})")


def rlhf_home() -> str:
    """Where built artefacts (the tiny demo model, generated demo data) are cached: ``$RLHF_HOME``."""
    return os.environ.get("RLHF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "rlhf"))
