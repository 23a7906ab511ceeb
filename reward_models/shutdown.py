"""Graceful shutdown: on SIGTERM (or SIGINT) drain, then stop.

uvicorn alone closes the port at once and, after ``timeout_graceful_shutdown``, cancels what is still
running: the client gets a plain-text 500 and the log a CancelledError traceback. Here the first signal
only starts a drain (``Service.begin_drain``): /readyz answers 503 so a load balancer takes the replica
out, new requests get the API's JSON 503 + Retry-After (the port stays open, so they are answered rather
than refused), in-flight work goes on for up to ``grace_s`` and what is still waiting for the model then
gets the JSON 503 too. When no request is left (or the grace is over) uvicorn's own shutdown runs. A
second signal stops at once, as uvicorn does.
"""

from __future__ import annotations

import logging
import signal
import time

import uvicorn

log = logging.getLogger("reward_models.serve")
SETTLE_S = 2.0  # after the grace: for the 503s to be written before uvicorn's shutdown takes over


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service, grace_s: float):
        super().__init__(config)
        self.service, self.grace_s = service, grace_s
        self.drain_requested: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_requested is not None or not self.started:  # a second signal, or not serving yet
            return super().handle_exit(sig, frame)
        self.drain_requested = time.monotonic()  # a signal handler: the loop picks it up in on_tick
        log.info("%s: draining for up to %.0fs (/readyz answers 503, new requests are refused)",
                 signal.Signals(sig).name, self.grace_s)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested is not None and not self.should_exit:
            self.service.begin_drain(self.grace_s)
            over = time.monotonic() - self.drain_requested > self.grace_s + SETTLE_S
            if not self.server_state.tasks or over:
                log.info("drained: %d request(s) still open; shutting down", len(self.server_state.tasks))
                self.should_exit = True
        return await super().on_tick(counter)
