"""The scoring API's outermost layer: auth, body-size limit, headers, metrics and the one log line per request.

A pure ASGI middleware (``Gate``), so that auth and size are checked before any body is read, and one
Prometheus registry per app (``Metrics``), so several apps (tests, the benchmark) can live in one process.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING

import prometheus_client as prom
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .schemas import Json

if TYPE_CHECKING:
    from .service import Limits

log = logging.getLogger("reward_models.api")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
ENDPOINTS = frozenset({"/v1/score", "/v1/compare", "/v1/models", "/healthz", "/readyz", "/metrics", "/get_reward",
                       "/classify"}) | OPEN_PATHS


def api_key_from_env(name: str) -> str | None:
    """The bearer key held by the environment variable ``name``; None if it is unset (auth off). Set but empty
    is an error rather than auth silently off, and surrounding whitespace (a key read from a file) is cut."""
    value = os.environ.get(name)
    if value is None:
        return None
    key = value.strip()
    if not key:
        raise ValueError(f"{name} is set but empty: set it to a key, or unset it to serve without auth")
    if not (key.isascii() and key.isprintable()):
        raise ValueError(f"{name}: the key must be printable ASCII (it travels in an HTTP header)")
    return key


class Metrics:
    def __init__(self, depth):
        r = self.registry = prom.CollectorRegistry()
        seconds = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
        self.requests = prom.Counter("rm_requests_total", "HTTP requests.", ["endpoint", "status"], registry=r)
        self.latency = prom.Histogram("rm_request_duration_seconds", "Latency.", ["endpoint"], registry=r, buckets=seconds)
        self.items = prom.Counter("rm_items_total", "Items answered, by outcome (scored or an error code).", ["outcome"],
                                  registry=r)
        self.tokens = prom.Counter("rm_tokens_total", "Tokens through the model, padding excluded.", registry=r)
        self.padded = prom.Counter("rm_padded_tokens_total", "Tokens through the model, padding included.", registry=r)
        self.batch_size = prom.Histogram("rm_batch_size", "Items per forward pass.", registry=r,
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.forward = prom.Histogram("rm_forward_duration_seconds", "Forward passes.", registry=r, buckets=seconds)
        self.ready = prom.Gauge("rm_ready", "1 once the model is loaded and warm.", registry=r)
        prom.Gauge("rm_queue_depth", "Items waiting for the model.", registry=r).set_function(depth)

    def on_batch(self, n: int, padded: int, real: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.padded.inc(padded)
        self.tokens.inc(real)
        self.forward.observe(seconds)


def document_auth(app: FastAPI, with_key: bool) -> None:
    """Auth is enforced by ``Gate`` (before any body is read); this only shows it in the OpenAPI schema, when
    this server has a key (a document that asks for a bearer token the server ignores would be wrong)."""
    def openapi():
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            if with_key:
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, ops in schema["paths"].items():
                    for op in ops.values() if path not in OPEN_PATHS else ():
                        op["security"] = [{"bearer": []}]
                        op.setdefault("responses", {}).setdefault("401", {"description": "No or a wrong bearer key"})
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi


class _TooLarge(HTTPException):
    """Raised while reading the body; an HTTPException so FastAPI passes it on instead of answering 400."""


class Gate:
    """Pure ASGI middleware, outermost: auth, the body-size limit, the revision and request-id headers,
    metrics, the one log line per request, and a JSON 500 for anything unexpected. Auth and size are checked
    before the body is read, so an unauthenticated or oversized request costs the server nothing."""

    def __init__(self, app, state, metrics: Metrics, limits: Limits, api_key: str | None):
        self.app, self.state, self.metrics, self.limits = app, state, metrics, limits
        self.api_key = api_key.encode() if api_key else None
        self.prefix, self.counter = f"{os.getpid():x}{int(time.time()) & 0xffff:04x}", itertools.count(1)

    def _reject(self, status: int, code: str, message: str, headers: dict | None = None) -> Json:
        return Json({"error": {"code": code, "message": message}, "model_revision": self.state.revision}, status,
                    headers=headers)

    def _check(self, path: str, headers: dict) -> Json | None:
        if self.api_key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return self._reject(401, "unauthorized", "a valid bearer token is required",
                                    {"WWW-Authenticate": 'Bearer realm="reward-model"'})
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return self._reject(400, "bad_request", "bad Content-Length")
        if int(length) > self.limits.max_body_bytes:
            return self._reject(413, "body_too_large", f"the body is over the limit of {self.limits.max_body_bytes} bytes")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path, headers = time.perf_counter(), scope["path"], dict(scope["headers"])
        endpoint = path if path in ENDPOINTS else "other"
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        if not (0 < len(request_id) <= 64 and request_id.replace("-", "").replace("_", "").isalnum()):
            request_id = f"{self.prefix}-{next(self.counter):x}"  # never echo an arbitrary client string into logs
        status, received = [0], [0]

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                extra = [(b"x-request-id", request_id.encode())]
                extra += [(b"x-model-revision", self.state.revision.encode())] if self.state.revision else []
                extra += [(b"connection", b"close")] if self.state.draining else []  # reconnect to another replica
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        async def receive_limited():  # a body without Content-Length (chunked) is counted as it arrives
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.limits.max_body_bytes:
                raise _TooLarge(413, f"the body is over the limit of {self.limits.max_body_bytes} bytes")
            return message

        try:
            rejection = self._check(path, headers)
            await (rejection or self.app)(scope, receive if rejection else receive_limited, send_wrapped)
        except ClientDisconnect:  # gone while sending its body (or closed for being too slow): nobody to answer
            status[0] = status[0] or 499
        except Exception as exc:  # the type only: a message could quote request text
            log.error("request %s %s failed: %s", request_id, endpoint, type(exc).__name__)
            if not status[0]:
                await self._reject(500, "internal_error", "internal error")(scope, receive, send_wrapped)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(endpoint, str(status[0] or 500)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            if endpoint not in ("/metrics", "/healthz", "/readyz"):
                items = scope.get("state", {}).get("items", "-")
                log.info("%s %s %s %d items=%s %.1fms", request_id, scope["method"], endpoint, status[0] or 500, items,
                         seconds * 1000)
