"""The scoring service behind every endpoint, native and protocol adapters alike: one scorer, one batcher
and one set of limits, so an adapter is only a change of request and response shapes.

Work per request is bounded before the model sees it: items are cut to the model's length before they
are tokenized (``reward_models.rendering``), at most ``render_concurrency`` large requests are tokenized
at once, and rendering stops as soon as a request's tokens pass ``max_total_tokens`` (what the request
asks the model to read: after truncation).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from dataclasses import asdict, dataclass

from .batching import MicroBatcher, QueueFull
from .schemas import ApiError
from .scoring import TooLong, render_item

log = logging.getLogger("reward_models.api")
RENDER_INLINE_CHARS = 16_384  # bigger requests are tokenized in a thread so the event loop stays free


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 << 20  # 413
    max_items: int = 256  # items per request, 413
    max_total_tokens: int = 262_144  # tokens the model would read for one request, 413
    max_batch_tokens: int = 8192  # padded tokens (items x longest) per forward
    max_batch_items: int = 64
    max_wait_ms: float = 2.0  # how long a lone item waits for company
    wait_policy: str = "adaptive"  # or "always" (see reward_models.batching)
    max_queue: int = 1024  # items waiting for the model; beyond: 429
    request_timeout_s: float = 60.0  # then 503
    render_concurrency: int = 4  # large requests being tokenized at once (the others wait their turn)
    api_key_env: str = "RLHF_API_KEY"  # the key is read from this variable, never from a flag

    def __post_init__(self):
        for name, value in asdict(self).items():
            if name not in ("api_key_env", "wait_policy") and not value > 0:
                raise ValueError(f"Limits.{name} must be positive, got {value}")
        if self.wait_policy not in ("adaptive", "always"):
            raise ValueError(f"Limits.wait_policy must be 'adaptive' or 'always', got {self.wait_policy!r}")
        if self.max_items > self.max_queue:  # such a request could never be admitted: 429 forever
            raise ValueError(f"max_items ({self.max_items}) must not exceed max_queue ({self.max_queue})")


class Service:
    """The loaded model and what every request goes through: ``render`` then ``run``."""

    def __init__(self, limits: Limits, metrics):
        self.limits, self.metrics = limits, metrics
        self.scorer = self.batcher = self.revision = self.failed = None
        self.draining = False  # SIGTERM: finish what is in flight, take nothing new (see reward_models.shutdown)
        self._rendering = asyncio.Semaphore(limits.render_concurrency)
        self._stopping = asyncio.Event()  # the drain's grace period is over

    def ready(self):
        """The scorer and batcher, for a new request; 503 while loading or draining."""
        if self.draining:
            raise ApiError(503, "shutting_down", "the server is shutting down; retry on another replica",
                           {"Retry-After": "1"})
        if self.batcher is None:
            raise ApiError(503, "not_ready", f"the model is {'failed' if self.failed else 'loading'}", {"Retry-After": "5"})
        return self.scorer, self.batcher

    def begin_drain(self, grace_s: float) -> None:
        """Refuse new requests; the batcher stops waiting for company; after ``grace_s`` what is still
        waiting for the model is answered 503."""
        if self.draining:
            return
        self.draining = True
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.flush()
        asyncio.get_running_loop().call_later(grace_s, self._stopping.set)

    async def load(self, scorer) -> None:
        """``scorer``: a loaded ``RewardScorer``, or a no-argument callable that loads one."""
        limits = self.limits
        loaded = scorer if hasattr(scorer, "score_ids") else await asyncio.to_thread(scorer)
        batcher = MicroBatcher(loaded.score_ids, max_batch_tokens=limits.max_batch_tokens,
                               max_batch_items=limits.max_batch_items, max_wait_s=limits.max_wait_ms / 1000,
                               max_queue=limits.max_queue, wait_policy=limits.wait_policy,
                               on_batch=self.metrics.on_batch)
        await batcher.start()
        warm = loaded.render({"text": "warm-up"}).input_ids
        await asyncio.gather(*batcher.submit([warm]))
        overhead = await batcher.calibrate(warm, loaded.max_length)
        self.scorer, self.revision, self.batcher = loaded, loaded.revision, batcher
        self.metrics.ready.set(1)
        log.info("model ready: revision %s, max_length %d; a forward pass costs as much as %s padded tokens",
                 loaded.revision, loaded.max_length, f"{overhead:.0f}" if overhead else "no")

    async def close(self) -> None:
        if self.batcher is not None:
            batcher, self.batcher = self.batcher, None  # /readyz answers 503 from here on
            await batcher.close()

    def _render_all(self, items: list[dict], truncate: bool, max_length: int | None) -> list:
        """Each item's ``Rendered``, or the ``TooLong`` / ``ApiError`` that stands for it."""
        out, total, memo = [], 0, {}
        tokenizer, max_length = self.scorer.tokenizer, max_length or self.scorer.max_length
        for item in items:
            try:
                rendered = render_item(tokenizer, item, max_length, truncate, memo)
            except TooLong as exc:
                out.append(exc)
                continue
            except Exception as exc:  # e.g. a lone surrogate, or a chat template that refuses the roles given
                out.append(ApiError(422, "render_failed", f"cannot render the item: {type(exc).__name__}: {exc}"))
                continue
            total += rendered.n_tokens
            if total > self.limits.max_total_tokens:
                raise ApiError(413, "too_many_tokens", f"the request has more than {self.limits.max_total_tokens} "
                               "tokens, the limit; split it into smaller requests")
            out.append(rendered)
        return out

    async def render(self, items: list[dict], truncate: bool, max_length: int | None = None) -> list:
        if self.scorer is None:
            self.ready()
        chars = sum(len(str(v)) for item in items for v in item.values())
        if chars <= RENDER_INLINE_CHARS:
            return self._render_all(items, truncate, max_length)
        async with self._rendering:
            return await asyncio.to_thread(self._render_all, items, truncate, max_length)

    async def run(self, rendered: list, request=None) -> list[float]:
        """Raw rewards of rendered items, through the shared batcher. What the model has not started is
        dropped from the queue when the client disconnects (``request``: the ASGI request to watch), the
        request times out or the shutdown grace period ends."""
        batcher = self.batcher
        if batcher is None:  # closed while this request was rendering
            self.ready()
        try:
            futures = batcher.submit([r.input_ids for r in rendered])
        except QueueFull as exc:
            raise ApiError(429, "queue_full", str(exc), {"Retry-After": str(exc.retry_after)}) from None
        answer = asyncio.gather(*futures)
        stopping = asyncio.ensure_future(self._stopping.wait())
        gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        try:
            done, _ = await asyncio.wait([answer, stopping, *([gone] if gone else [])],
                                         timeout=self.limits.request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watcher in (stopping, gone):
                if watcher is not None:
                    watcher.cancel()
        if answer in done:
            return answer.result()
        answer.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved" log
        batcher.discard(futures)
        outcome = "cancelled" if gone in done else "shutting_down" if stopping in done else "timeout"
        self.metrics.items.labels(outcome).inc(len(rendered))
        if outcome == "cancelled":  # nobody reads this answer: it only names the request in the log (499, as nginx)
            raise ApiError(499, "client_disconnected", "the client closed the connection")
        if outcome == "shutting_down":
            raise ApiError(503, "shutting_down", "the server is shutting down; retry on another replica",
                           {"Retry-After": "1"})
        raise ApiError(503, "timeout", "timed out waiting for the model", {"Retry-After": "1"})

    def model_id(self) -> str:
        """The served model's name: its directory's (the server's file layout stays private)."""
        return os.path.basename(os.path.normpath(self.scorer.path or "reward-model"))

    def normalize(self, reward: float) -> float:
        return self.scorer.normalize(reward)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


async def _disconnected(request) -> None:
    """Returns when the client has gone: after the body, the next ASGI message is http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
