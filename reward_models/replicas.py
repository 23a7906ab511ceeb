"""``--workers N``: N server processes, each with its own copy of the model, sharing one listening socket.

The parent binds the port and listens; the kernel hands each new connection to whichever worker accepts
it first, so the replicas share the load behind one address. A worker that dies (e.g. killed for memory)
is restarted; one that exits 1 (its model failed to load) stops them all, since every restart would fail
the same way. SIGTERM/SIGINT to the parent is passed to every worker as SIGTERM, and each drains as a
single server does (``reward_models.shutdown``). Workers run in their own session, so a Ctrl-C in the
terminal reaches them once, through the parent, not twice.

Each worker has its own metrics and its own /readyz: scrape and probe them as one target only if that is
acceptable (the counters are per worker), or run single-worker replicas on separate ports behind a load
balancer, and give ``RewardClient`` the list of their URLs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("reward_models.serve")
LOAD_FAILED = 1  # a worker's exit status when its model did not load


def supervise(workers: int, target: Callable, args, sock: socket.socket) -> int:
    """Run ``target(args, sock)`` in ``workers`` spawned processes until a signal; returns the exit status."""
    multiprocessing.allow_connection_pickling()  # the listening socket travels to the spawned workers
    context = multiprocessing.get_context("spawn")  # not fork: the parent has imported torch

    def start():
        process = context.Process(target=_worker, args=(target, args, sock), daemon=False)
        process.start()
        return process

    processes = [start() for _ in range(workers)]
    stopping = threading.Event()

    def forward(sig, frame):
        stopping.set()
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    log.info("started %d workers: %s", workers, ", ".join(str(p.pid) for p in processes))
    status = 0
    while not stopping.wait(0.5):
        for i, process in enumerate(processes):
            if process.is_alive() or stopping.is_set():
                continue
            if process.exitcode == LOAD_FAILED:
                log.error("worker %d could not load the model: stopping", process.pid)
                status = LOAD_FAILED
                forward(signal.SIGTERM, None)
                break
            processes[i] = start()
            log.warning("worker %d exited with status %s: restarted as %d", process.pid, process.exitcode,
                        processes[i].pid)
    for process in processes:
        process.join()
    return status


def _worker(target: Callable, args, sock: socket.socket) -> None:
    os.setsid()
    raise SystemExit(target(args, sock))
