"""The reward-model scoring API: ``create_app(scorer, limits)`` (docs/design.md, Scoring API; reference: docs/api.md).

Status codes: 401 missing/wrong bearer key; 413 anything too big to take at once (body bytes, items per
request, tokens per request: the client should split); 422 a request that is malformed (bad JSON, wrong
types, unknown fields, no items) or, on the single-answer endpoints (/v1/compare, the protocol
adapters), an input over the model's length or a non-finite reward; 429 queue full (with Retry-After);
503 model loading, server shutting down, or the answer timed out (with Retry-After). In /v1/score a bad
*item* never fails the request: it gets its own ``error`` and the other items are scored.

The per-item token limit is the scorer's ``max_length`` (``--max-length``, by default the length the RM
was trained with): one number, so /v1/models reports it and truncation cuts to it. With a key set,
everything except /healthz, /readyz and the docs needs it, /metrics included. No request text ever
reaches a log line: logs carry ids, counts and timings."""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import asdict

import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import protocols
from .gate import Gate, Metrics, api_key_from_env, document_auth
from .schemas import (
    ApiError,
    CompareRequest,
    CompareResponse,
    InvalidItem,
    Json,
    ScoreRequest,
    ScoreResponse,
    describe,
)
from .scoring import TooLong
from .service import Limits, Service, sigmoid

__all__ = ["Limits", "create_app"]
log = logging.getLogger("reward_models.api")


NON_FINITE = {"code": "non_finite_reward", "message": "the model's reward for this input is not a finite number"}


def _result(item, rendered, reward, service: Service) -> dict:
    result = {"id": item.id, "reward": None, "normalized_reward": None, "tokens": None, "truncated": False, "error": None}
    if reward is not None and not math.isfinite(reward):  # JSON has no NaN: say so instead of breaking the body
        result.update(tokens=rendered.n_tokens, truncated=rendered.truncated, error=NON_FINITE)
    elif reward is not None:
        result.update(reward=reward, normalized_reward=service.normalize(reward), tokens=rendered.n_tokens,
                      truncated=rendered.truncated)
    elif isinstance(rendered, TooLong):
        result["error"] = {"code": "too_long", "message": str(rendered)}
    elif isinstance(rendered, ApiError):
        result["error"] = {"code": rendered.code, "message": rendered.message}
    else:
        result["error"] = {"code": "invalid_item", "message": item.message}
    return result


def create_app(scorer, limits: Limits | None = None, on_load_failure=None, openrlhf_reward: str = "normalized") -> FastAPI:
    """``scorer``: a loaded ``RewardScorer``, or a no-argument callable that loads one (the app then answers
    /healthz at once, and /readyz once the model is loaded and warmed up by a forward pass).
    ``openrlhf_reward``: what /get_reward answers, "normalized" or "raw" rewards (``reward_models.protocols``)."""
    limits = limits or Limits()
    api_key = api_key_from_env(limits.api_key_env)
    metrics = Metrics(lambda: service.batcher.depth if service.batcher else 0)
    service = Service(limits, metrics)

    async def load():
        try:
            await service.load(scorer)
        except Exception as exc:
            service.failed = f"{type(exc).__name__}: {exc}"
            log.error("model load failed: %s", service.failed)
            if on_load_failure is not None:
                on_load_failure()

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(load())
        yield
        task.cancel()
        await service.close()

    app = FastAPI(title="Reward-model scoring API", version="1", lifespan=lifespan, description=__doc__.split("\n\n", 1)[1])
    app.state.rm, app.state.metrics = service, metrics

    def error(status: int, code: str, message: str, headers: dict | None = None, **extra) -> Json:
        return Json({"error": {"code": code, "message": message, **extra}, "model_revision": service.revision}, status,
                    headers=headers)

    def http_error(request, exc):  # FastAPI answers 400 to a body it cannot decode (e.g. not UTF-8): that is a 422
        if isinstance(exc.__cause__, ClientDisconnect):  # or to a client gone before its body was complete
            return error(499, "client_disconnected", "the client closed the connection")
        if exc.status_code == 400:
            return error(422, "invalid_request", "the body is not valid JSON (UTF-8)")
        code = "body_too_large" if exc.status_code == 413 else "http_error"
        return error(exc.status_code, code, str(exc.detail), exc.headers)

    def invalid(request, exc):  # no `input` in the details: it would echo (possibly huge) request text back
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()[:20]]
        return error(422, "invalid_request", describe(exc.errors()), details=details)

    app.add_exception_handler(ApiError, lambda request, exc: error(exc.status, exc.code, exc.message, exc.headers))
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)

    @app.post("/v1/score", response_model=ScoreResponse, responses={413: {}, 422: {}, 429: {}, 503: {}})
    async def score(body: ScoreRequest, request: Request):
        """Score items; each gets a reward, a normalized reward and the tokens the model read, or its own error."""
        request.state.items = len(body.items)
        if len(body.items) > limits.max_items:
            raise ApiError(413, "too_many_items", f"{len(body.items)} items, over the limit of {limits.max_items}")
        service.ready()
        valid = [i for i, item in enumerate(body.items) if not isinstance(item, InvalidItem)]
        rendered = dict(zip(valid, await service.render([body.items[i].model_dump(exclude={"id"}) for i in valid],
                                                        body.truncate)))
        ok = [i for i in valid if hasattr(rendered[i], "input_ids")]
        rewards = dict(zip(ok, await service.run([rendered[i] for i in ok], request))) if ok else {}
        results = [_result(item, rendered.get(i), rewards.get(i), service) for i, item in enumerate(body.items)]
        for r in results:
            metrics.items.labels(r["error"]["code"] if r["error"] else "scored").inc()
        return Json({"model_revision": service.revision, "results": results})

    @app.post("/v1/compare", response_model=CompareResponse, responses={413: {}, 422: {}, 429: {}, 503: {}})
    async def compare(body: CompareRequest, request: Request):
        """Score two responses to one prompt: margin = r(chosen) - r(rejected), p_chosen = sigmoid(margin)."""
        request.state.items = 2
        service.ready()

        def turns(x, role):
            return [{"role": role, "content": x}] if isinstance(x, str) else [m.model_dump() for m in x]

        items = [{"messages": turns(body.prompt, "user") + turns(side, "assistant")} for side in (body.chosen, body.rejected)]
        rendered = await service.render(items, body.truncate)
        for name, r in zip(("chosen", "rejected"), rendered):
            if not hasattr(r, "input_ids"):  # a single answer: its problem is the request's
                raise ApiError(422, "too_long" if isinstance(r, TooLong) else r.code, f"{name}: {getattr(r, 'message', r)}")
        rewards = await service.run(rendered, request)
        if not all(map(math.isfinite, rewards)):
            raise ApiError(422, NON_FINITE["code"], NON_FINITE["message"])
        metrics.items.labels("scored").inc(2)
        margin = rewards[0] - rewards[1]
        sides = {name: {"reward": reward, "normalized_reward": service.normalize(reward), "tokens": r.n_tokens,
                        "truncated": r.truncated} for name, reward, r in zip(("chosen", "rejected"), rewards, rendered)}
        return Json({"model_revision": service.revision, **sides, "margin": margin, "p_chosen": sigmoid(margin)})

    @app.get("/v1/models")
    async def models():
        """The served model (revision hash, max length, normalization statistics) and the limits."""
        scorer_, _ = service.ready()
        info = scorer_.info()
        model = {k: v for k, v in info.items() if k != "path"} | {"id": service.model_id()}
        shown = {k: v for k, v in asdict(limits).items() if k != "api_key_env"}
        return Json({"model_revision": service.revision, "models": [model], "auth": api_key is not None,
                     "limits": {**shown, "max_item_tokens": scorer_.max_length}})

    @app.get("/healthz")
    async def healthz():
        """The process is alive (the model may still be loading)."""
        return Json({"status": "ok", "model_revision": service.revision})

    @app.get("/readyz", responses={503: {}})
    async def readyz():
        """200 once the model is loaded and warmed up by a forward pass; 503 before, if loading failed, or draining."""
        if service.draining:  # SIGTERM: a load balancer takes this replica out while it finishes its work
            return Json({"status": "draining", "model_revision": service.revision}, 503)
        if service.batcher is not None:
            return Json({"status": "ready", "model_revision": service.revision})
        failed = {"status": "failed", "error": service.failed} if service.failed else {"status": "loading"}
        return Json({**failed, "model_revision": None}, 503)

    @app.get("/metrics", response_class=Response)
    async def prometheus():
        """Prometheus text format."""
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    app.include_router(protocols.router(service, openrlhf_reward))
    document_auth(app, api_key is not None)
    app.add_middleware(Gate, state=service, metrics=metrics, limits=limits, api_key=api_key)
    return app
