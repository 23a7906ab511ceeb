"""The reward-model scoring API: ``create_app(scorer, limits)`` (docs/design.md, Scoring API; the reference: docs/api.md).

Status codes: 401 missing/wrong bearer key; 413 anything too big to take at once (body bytes, items per
request, tokens per request: the client should split); 422 a request that is malformed (bad JSON, wrong
types, unknown fields, no items) or, on the single-item endpoint /v1/compare, an input over the model's
length; 429 queue full (with Retry-After); 503 model not loaded yet or the answer timed out. In /v1/score a
bad *item* never fails the request: it gets its own ``error`` and the other items are scored.

The per-item token limit is the scorer's ``max_length`` (``--max-length``): one number, so /v1/models
reports it and truncation cuts to it. With a key set, everything except /healthz, /readyz and the docs
needs it, /metrics included. No request text ever reaches a log line: logs carry ids, counts and timings.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from .batching import MicroBatcher, QueueFull
from .gate import Gate, Metrics, document_auth
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

log = logging.getLogger("reward_models.api")
RENDER_INLINE_CHARS = 16_384  # bigger requests are tokenized in a thread so the event loop stays free


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 << 20  # 413
    max_items: int = 256  # items per request, 413
    max_total_tokens: int = 262_144  # rendered tokens per request, 413
    max_batch_tokens: int = 8192  # padded tokens (items x longest) per forward
    max_batch_items: int = 64
    max_wait_ms: float = 2.0  # how long a lone item waits for company
    wait_policy: str = "adaptive"  # or "always" (see reward_models.batching)
    max_queue: int = 1024  # items waiting for the model; beyond: 429
    request_timeout_s: float = 60.0  # then 503
    api_key_env: str = "RLHF_API_KEY"  # the key is read from this variable, never from a flag

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name not in ("api_key_env", "wait_policy") and not value > 0:
                raise ValueError(f"Limits.{name} must be positive, got {value}")
        if self.wait_policy not in ("adaptive", "always"):
            raise ValueError(f"Limits.wait_policy must be 'adaptive' or 'always', got {self.wait_policy!r}")
        if self.max_items > self.max_queue:  # such a request could never be admitted: 429 forever
            raise ValueError(f"max_items ({self.max_items}) must not exceed max_queue ({self.max_queue})")


# ---------------------------------------------------------------------------------------------
# the app


class _State:
    scorer = batcher = revision = failed = None

    def ready(self):
        if self.batcher is None:
            raise ApiError(503, "not_ready", f"the model is {'failed' if self.failed else 'loading'}", {"Retry-After": "5"})
        return self.scorer, self.batcher


def _render_all(scorer, items: list[dict], truncate: bool) -> list:
    """Each item's ``Rendered``, or the ``TooLong`` / ``ApiError`` that stands for it."""
    out = []
    for item in items:
        try:
            out.append(scorer.render(item, truncate))
        except TooLong as exc:
            out.append(exc)
        except Exception as exc:  # e.g. a lone surrogate, or a chat template that refuses the roles given
            out.append(ApiError(422, "render_failed", f"cannot render the item: {type(exc).__name__}: {exc}"))
    return out


def _result(item, rendered, reward, scorer) -> dict:
    result = {"id": item.id, "reward": None, "normalized_reward": None, "tokens": None, "truncated": False, "error": None}
    if reward is not None:
        result.update(reward=reward, normalized_reward=scorer.normalise(reward), tokens=rendered.n_tokens,
                      truncated=rendered.truncated)
    elif isinstance(rendered, TooLong):
        result.update(tokens=rendered.n_tokens, error={"code": "too_long", "message": str(rendered)})
    elif isinstance(rendered, ApiError):
        result["error"] = {"code": rendered.code, "message": rendered.message}
    else:
        result["error"] = {"code": "invalid_item", "message": item.message}
    return result


def create_app(scorer, limits: Limits | None = None, on_load_failure=None) -> FastAPI:
    """``scorer``: a loaded ``RewardScorer``, or a no-argument callable that loads one (the app then answers
    /healthz at once, and /readyz once the model is loaded and warmed up by a forward pass)."""
    limits = limits or Limits()
    api_key = os.environ.get(limits.api_key_env) or None
    state = _State()
    metrics = Metrics(lambda: state.batcher.depth if state.batcher else 0)

    async def load():
        try:
            loaded = scorer if hasattr(scorer, "score_ids") else await asyncio.to_thread(scorer)
            batcher = MicroBatcher(loaded.score_ids, max_batch_tokens=limits.max_batch_tokens,
                                   max_batch_items=limits.max_batch_items, max_wait_s=limits.max_wait_ms / 1000,
                                   max_queue=limits.max_queue, wait_policy=limits.wait_policy, on_batch=metrics.on_batch)
            await batcher.start()
            warm = loaded.render({"text": "warm-up"}).input_ids
            await asyncio.gather(*batcher.submit([warm]))
            overhead = await batcher.calibrate(warm, loaded.max_length)
        except Exception as exc:
            state.failed = f"{type(exc).__name__}: {exc}"
            log.error("model load failed: %s", state.failed)
            if on_load_failure is not None:
                on_load_failure()
            return
        state.scorer, state.revision, state.batcher = loaded, loaded.revision, batcher
        metrics.ready.set(1)
        log.info("model ready: revision %s, max_length %d; a forward pass costs as much as %s padded tokens",
                 loaded.revision, loaded.max_length, f"{overhead:.0f}" if overhead else "no")

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(load())
        yield
        task.cancel()
        if state.batcher is not None:
            batcher, state.batcher = state.batcher, None  # draining: /readyz answers 503 from here on
            await batcher.close()

    app = FastAPI(title="Reward-model scoring API", version="1", lifespan=lifespan, description=__doc__.split("\n\n", 1)[1])
    app.state.rm, app.state.metrics = state, metrics

    def error(status: int, code: str, message: str, headers: dict | None = None, **extra) -> Json:
        return Json({"error": {"code": code, "message": message, **extra}, "model_revision": state.revision}, status,
                    headers=headers)

    def http_error(request, exc):  # FastAPI answers 400 to a body it cannot decode (e.g. not UTF-8): that is a 422
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

    async def render(scorer_, items: list[dict], truncate: bool) -> list:
        chars = sum(len(str(v)) for item in items for v in item.values())
        if chars <= RENDER_INLINE_CHARS:
            return _render_all(scorer_, items, truncate)
        return await asyncio.to_thread(_render_all, scorer_, items, truncate)

    async def run_model(batcher: MicroBatcher, rendered: list) -> list[float]:
        total = sum(len(r.input_ids) for r in rendered)
        if total > limits.max_total_tokens:
            raise ApiError(413, "too_many_tokens", f"the request has {total} tokens, over the limit of "
                           f"{limits.max_total_tokens}; split it into smaller requests")
        try:
            futures = batcher.submit([r.input_ids for r in rendered])
        except QueueFull as exc:
            raise ApiError(429, "queue_full", str(exc), {"Retry-After": str(exc.retry_after)}) from None
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, "timeout", "timed out waiting for the model", {"Retry-After": "1"}) from None

    @app.post("/v1/score", response_model=ScoreResponse, responses={413: {}, 422: {}, 429: {}, 503: {}})
    async def score(body: ScoreRequest, request: Request):
        """Score items; each gets a reward, a normalised reward and its token count, or its own error."""
        request.state.items = len(body.items)
        if len(body.items) > limits.max_items:
            raise ApiError(413, "too_many_items", f"{len(body.items)} items, over the limit of {limits.max_items}")
        scorer_, batcher = state.ready()
        valid = [i for i, item in enumerate(body.items) if not isinstance(item, InvalidItem)]
        rendered = dict(zip(valid, await render(scorer_, [body.items[i].model_dump(exclude={"id"}) for i in valid],
                                                body.truncate)))
        ok = [i for i in valid if hasattr(rendered[i], "input_ids")]
        rewards = dict(zip(ok, await run_model(batcher, [rendered[i] for i in ok]))) if ok else {}
        results = [_result(item, rendered.get(i), rewards.get(i), scorer_) for i, item in enumerate(body.items)]
        for r in results:
            metrics.items.labels(r["error"]["code"] if r["error"] else "scored").inc()
        return Json({"model_revision": state.revision, "results": results})

    @app.post("/v1/compare", response_model=CompareResponse, responses={413: {}, 422: {}, 429: {}, 503: {}})
    async def compare(body: CompareRequest, request: Request):
        """Score two responses to one prompt: margin = r(chosen) - r(rejected), p_chosen = sigmoid(margin)."""
        request.state.items = 2
        scorer_, batcher = state.ready()

        def turns(x, role):
            return [{"role": role, "content": x}] if isinstance(x, str) else [m.model_dump() for m in x]

        items = [{"messages": turns(body.prompt, "user") + turns(side, "assistant")} for side in (body.chosen, body.rejected)]
        rendered = await render(scorer_, items, body.truncate)
        for name, r in zip(("chosen", "rejected"), rendered):
            if not hasattr(r, "input_ids"):  # a single answer: its problem is the request's
                raise ApiError(422, "too_long" if isinstance(r, TooLong) else r.code, f"{name}: {getattr(r, 'message', r)}")
        rewards = await run_model(batcher, rendered)
        metrics.items.labels("scored").inc(2)
        margin = rewards[0] - rewards[1]
        sides = {name: {"reward": reward, "normalized_reward": scorer_.normalise(reward), "tokens": r.n_tokens,
                        "truncated": r.truncated} for name, reward, r in zip(("chosen", "rejected"), rewards, rendered)}
        p_chosen = 1 / (1 + math.exp(-margin)) if margin >= 0 else math.exp(margin) / (1 + math.exp(margin))
        return Json({"model_revision": state.revision, **sides, "margin": margin, "p_chosen": p_chosen})

    @app.get("/v1/models")
    async def models():
        """The served model (revision hash, max length, normalisation statistics) and the limits."""
        scorer_, _ = state.ready()
        info = scorer_.info()
        model = {k: v for k, v in info.items() if k != "path"}  # the server's file layout stays private
        model["id"] = os.path.basename(os.path.normpath(info.get("path") or "reward-model"))
        shown = {k: v for k, v in asdict(limits).items() if k != "api_key_env"}
        return Json({"model_revision": state.revision, "models": [model], "auth": api_key is not None,
                     "limits": {**shown, "max_item_tokens": scorer_.max_length}})

    @app.get("/healthz")
    async def healthz():
        """The process is alive (the model may still be loading)."""
        return Json({"status": "ok", "model_revision": state.revision})

    @app.get("/readyz", responses={503: {}})
    async def readyz():
        """200 once the model is loaded and warmed up by a forward pass; 503 before, or if loading failed."""
        if state.batcher is not None:
            return Json({"status": "ready", "model_revision": state.revision})
        failed = {"status": "failed", "error": state.failed} if state.failed else {"status": "loading"}
        return Json({**failed, "model_revision": None}, 503)

    @app.get("/metrics", response_class=Response)
    async def prometheus():
        """Prometheus text format."""
        return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    document_auth(app)
    app.add_middleware(Gate, state=state, metrics=metrics, limits=limits, api_key=api_key)
    return app
