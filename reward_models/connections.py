"""Connection hygiene: uvicorn's h11 protocol with read deadlines, and the uvicorn settings that bound connections.

uvicorn times a connection only while it is idle between requests (``timeout_keep_alive``): a client that
connects and sends nothing, or sends its headers or body a byte at a time, holds the connection (and a
slot of ``limit_concurrency``) forever. ``ReadDeadlines`` closes a connection whose request headers are not
complete ``header_s`` after it opened (or after its first byte, on a kept-alive connection), or whose body
is not complete ``body_s`` after its headers. Everything else is uvicorn's own: ``limit_concurrency``
(connections plus requests in progress; beyond it uvicorn answers 503), ``timeout_keep_alive`` and h11's
header size limit (``h11_max_incomplete_event_size``; beyond it a 400).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("reward_models.api")


@dataclass(frozen=True)
class ConnectionLimits:
    timeout_header_s: float = 10.0  # until the request's headers are complete
    timeout_body_s: float = 30.0  # from the headers until the body is complete (4 MB at ~1 Mbit/s)
    timeout_keep_alive_s: int = 5  # an idle connection between requests
    limit_concurrency: int = 512  # open connections + requests in progress; beyond: 503 from uvicorn
    max_header_bytes: int = 16 * 1024  # request line and headers; beyond: 400 from h11

    def uvicorn_settings(self) -> dict:
        return {"http": read_deadlines(self.timeout_header_s, self.timeout_body_s),
                "timeout_keep_alive": self.timeout_keep_alive_s, "limit_concurrency": self.limit_concurrency,
                "h11_max_incomplete_event_size": self.max_header_bytes}


def read_deadlines(header_s: float, body_s: float) -> type[H11Protocol]:
    """An H11Protocol class with these deadlines (uvicorn builds protocols from a class and its config)."""
    return type("ReadDeadlines", (ReadDeadlines,), {"header_s": header_s, "body_s": body_s})


class ReadDeadlines(H11Protocol):
    header_s: float = 10.0
    body_s: float = 30.0
    _deadline = None  # (phase, TimerHandle) while a request is being read

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm("headers", self.header_s)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE and data:  # part of the next request's headers
            self._arm("headers", self.header_s, keep=True)
        elif state is h11.SEND_BODY:
            self._arm("body", self.body_s, keep=True)
        else:  # the request is complete (or the connection is closing)
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, phase: str, seconds: float, keep: bool = False) -> None:
        if keep and self._deadline is not None and self._deadline[0] == phase:
            return  # the deadline runs from the start of the phase, not from the latest byte
        self._disarm()
        self._deadline = (phase, self.loop.call_later(seconds, self._expired, phase))

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline[1].cancel()
            self._deadline = None

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closed a connection: its request %s did not arrive in time", phase)
            self.transport.close()
