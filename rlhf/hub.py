"""Whether the Hugging Face Hub can be reached, asked once, and what a model or dataset name then means.

Offline, huggingface_hub retries every request for tens of seconds before giving up. One short probe at
start-up (a TCP connection to the Hub or the proxy, at most ``PROBE_SECONDS``) decides instead: when it
fails, the process and its children run as with ``HF_HUB_OFFLINE=1`` and say so once. The stages and the
dry run then judge a Hub name the same way (``check_model_source``, ``check_dataset_source``).
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from urllib.parse import urlparse

from .errors import UsageError
from .paths import is_local_path

PROBE_SECONDS = 2.0
TRUE = ("1", "ON", "YES", "TRUE")


def _probe_address() -> tuple[str, int]:
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _reachable(address: tuple[str, int], seconds: float) -> bool:
    outcome = []

    def connect():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection(address, timeout=seconds).close()
            outcome.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(outcome)


@functools.cache
def hub_offline() -> bool:
    """True when the Hub is not to be asked: HF_HUB_OFFLINE is set, or the probe failed (then it is set)."""
    if os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).upper() in TRUE:
        return True
    address = _probe_address()
    if _reachable(address, PROBE_SECONDS):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"  # children (accelerate launch) inherit it
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # imported before the probe: read at import time
            setattr(sys.modules[module], name, True)
    if os.environ.get("RANK", "0") == "0":
        print(f"rlhf: the Hugging Face Hub cannot be reached ({address[0]}:{address[1]}): running offline as with "
              "HF_HUB_OFFLINE=1 (Hub models and datasets from the local cache only; set HF_HUB_OFFLINE=1 yourself "
              "to skip this check)", file=sys.stderr)
    return True


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
        return True
    except Exception:  # not cached, or not a valid repo id
        if repo_type != "dataset":
            return False
    from datasets import config  # `datasets` keeps prepared Hub datasets in a cache of its own

    return os.path.isdir(os.path.join(config.HF_DATASETS_CACHE, repo_id.replace("/", "___")))


def check_model_source(key: str, name: str | None) -> str | None:
    """Raise ``UsageError`` for a model that cannot be loaded here; a note for a Hub model, else None."""
    if not name or name.startswith(("tiny:", "gguf:")) or os.path.exists(os.path.expanduser(name)):
        return None
    if is_local_path(name, (".gguf",)):  # a bare name may be a Hub id (gpt2): judged below
        where = "" if os.path.isabs(os.path.expanduser(name)) else f" (relative to {os.getcwd()})"
        raise UsageError(f"{key}={name}: no such directory{where}; give the path of a model "
                         "directory (an earlier stage's output_dir) or a Hub id such as Qwen/Qwen2.5-0.5B")
    if hub_offline() and not in_hub_cache(name):
        raise UsageError(f"{key}={name}: not a local directory, and offline (HF_HUB_OFFLINE=1) the Hub model is not "
                         f"in the local cache; give a local model directory, or fetch it with network first "
                         f"(hf download {name})")
    return f"{key}: {name} (Hub model{', from the local cache' if hub_offline() else ''})"


def check_dataset_source(name: str) -> str | None:
    """The same for a Hub dataset name (local files are validated by the data layer)."""
    if hub_offline() and not in_hub_cache(name, "dataset"):
        raise UsageError(f"dataset={name}: offline (HF_HUB_OFFLINE=1) and this Hub dataset is not in the local "
                         f"cache; give a local file (rlhf data inspect FILE checks it), or fetch it with network "
                         f"first (hf download {name} --repo-type dataset)")
    return f"dataset: {name} (Hub dataset{', from the local cache' if hub_offline() else ''})"
