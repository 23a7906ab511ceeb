"""Dynamic micro-batching for the scoring API: one bounded queue, one worker, one forward at a time.

Policy, and why:
- Admission is per request and all-or-nothing: a request whose items do not all fit in the queue is
  refused (``QueueFull`` -> 429) instead of half-queued, so a client never has to stitch a partial answer.
- The queue bound counts every item not yet handed to the model, including those the worker is still
  collecting, so ``max_queue`` really bounds the memory and the latency a burst can cause.
- The worker waits for more items at most ``max_wait`` after the *oldest* waiting item arrived, and not
  at all once a batch is full (items that queued up while the previous forward ran have waited already)
  or when requests arrive further apart than ``max_wait`` (a lone sequential client would only lose
  ``max_wait`` per request and never gain company; ``wait_policy="always"`` waits regardless, trading
  latency for fuller batches under a steady load). Under load, batches also form by themselves: items
  queue up while the model is busy.
- It then takes everything waiting, sorts it by length and cuts it into batches under a padded-token
  budget (items x longest item) and an item cap, where the padding a cut saves outweighs the cost of
  one more forward pass (``plan_batches``; the cost of a pass is measured at warm-up: ``calibrate``).
  Taking the whole queue per round keeps it FIFO between rounds: a long item is never starved.
- An item whose request is gone (client disconnected, timed out, server shutting down) is dropped from
  the queue at once (``discard``) and never computed, even when its round has already begun.
- Forwards run in one dedicated thread: the event loop keeps serving HTTP meanwhile, and a single thread
  means one forward at a time on the device. Futures are resolved back on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

ScoreFn = Callable[[list[list[int]]], list[float]]
# called after each forward: (items, padded tokens, real tokens, seconds)
BatchHook = Callable[[int, int, int, float], None]


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the scoring queue is full; retry in {retry_after}s")
        self.retry_after = retry_after


def plan_batches(lengths: Sequence[int], max_tokens: int, max_items: int,
                 overhead_tokens: float | None = None) -> list[list[int]]:
    """Group indices into batches of items of similar length (shortest first), each with
    ``len(batch) * longest <= max_tokens`` and ``len(batch) <= max_items`` (an item longer than
    ``max_tokens`` gets a batch of its own).

    Without ``overhead_tokens`` batches are filled greedily. With it -- the fixed cost of one forward
    pass, in padded tokens -- the sorted items are cut where that minimises
    ``sum over batches of (overhead_tokens + len(batch) * longest)``: a pass is split when the padding
    it saves outweighs the extra pass (dynamic programming over cut points, O(n * max_items)).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if overhead_tokens is None or len(order) > 4096:  # beyond that the DP would cost more than it saves
        batches: list[list[int]] = []
        for i in order:  # ascending: the item being added is the longest of its batch
            if batches and len(batches[-1]) < max_items and lengths[i] * (len(batches[-1]) + 1) <= max_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches
    sizes = [lengths[i] for i in order]
    best = [0.0] + [math.inf] * len(order)  # best[k]: cost of batching the k shortest items
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = sizes[end - 1]
        for start in range(end - 1, max(-1, end - 1 - max_items), -1):
            n = end - start
            if n > 1 and n * longest > max_tokens:
                break
            cost = best[start] + overhead_tokens + n * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches, end = [], len(order)
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def pass_overhead(tokens: tuple[int, int], seconds: tuple[float, float], floor: float = 16.0) -> float | None:
    """The fixed cost of one forward pass in padded-token equivalents, ``a / b`` in ``seconds = a + b *
    tokens``, from two timed shapes; None when padding looks free (then batches are simply filled)."""
    b = (seconds[1] - seconds[0]) / (tokens[1] - tokens[0])
    if b <= 0:
        return None
    return max(floor, (seconds[0] - b * tokens[0]) / b)


@dataclass(slots=True)
class _Pending:
    ids: list[int]
    future: asyncio.Future
    enqueued: float
    waiting: bool = True  # counted in the queue bound until handed to the model or dropped


class MicroBatcher:
    """Collects sequences from many requests and scores them in padded-token-bounded batches."""

    def __init__(self, score_fn: ScoreFn, *, max_batch_tokens: int = 8192, max_batch_items: int = 64,
                 max_wait_s: float = 0.002, max_queue: int = 1024, wait_policy: str = "adaptive",
                 on_batch: BatchHook | None = None):
        if wait_policy not in ("adaptive", "always"):
            raise ValueError(f"wait_policy must be 'adaptive' or 'always', got {wait_policy!r}")
        self.wait_policy = wait_policy
        self.score_fn, self.on_batch = score_fn, on_batch
        self.max_batch_tokens, self.max_batch_items = max_batch_tokens, max_batch_items
        self.max_wait_s, self.max_queue = max_wait_s, max_queue
        self._queue: deque[_Pending] = deque()
        self._round: list[_Pending] = []  # taken from the queue, being run batch by batch
        self._waiting = 0  # items admitted and not yet handed to the model (the 429 bound)
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._rate = 0.0  # items/s, moving average: the basis of Retry-After
        self.overhead_tokens: float | None = None  # see calibrate()
        self._gap = float("inf")  # seconds between requests, moving average: is waiting worth it?
        self._last_arrival = 0.0

    @property
    def depth(self) -> int:
        return self._waiting

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1, at most 60)."""
        if self._rate <= 0:
            return 1
        return max(1, min(60, math.ceil((self._waiting + 1) / self._rate)))

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rm-forward")
        self._worker = asyncio.create_task(self._run(), name="rm-batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for pending in [*self._round, *self._queue]:  # nobody may wait forever on a future we dropped
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the scoring service is shutting down"))
        self._queue.clear()
        self._waiting = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def calibrate(self, ids: list[int], max_length: int, repeats: int = 3) -> float | None:
        """Time a short and a long batch on the model (the fastest of a few runs: contention only ever adds)
        and give the planner the cost of one pass. On a CPU a pass is cheap and padding dear, so similar
        lengths are worth separate passes; on a GPU it is the other way round and batches stay whole."""
        short, long = (ids * 64)[: min(16, max_length)], (ids * 512)[: min(128, max_length)]
        shapes = ([short], [long] * 8)

        def fastest(batch):
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                self.score_fn(batch)
                best = min(best, time.perf_counter() - start)
            return best

        loop = asyncio.get_running_loop()
        seconds = [await loop.run_in_executor(self._executor, fastest, shape) for shape in shapes]
        if len(long) * 8 > len(short):
            self.overhead_tokens = pass_overhead((len(short), 8 * len(long)), (seconds[0], seconds[1]))
        return self.overhead_tokens

    def _leave(self, pending: _Pending) -> None:
        if pending.waiting:
            pending.waiting = False
            self._waiting -= 1

    def discard(self, futures: list[asyncio.Future]) -> int:
        """Cancel futures nobody waits for any more (a client that went away, a timeout, a shutdown) and free
        their room in the queue at once; returns how many of them had not been computed."""
        targets = set(futures)
        pending = sum(not f.done() for f in futures)
        for f in futures:
            f.cancel()
        for p in [*self._queue, *self._round]:
            if p.future in targets:
                self._leave(p)
        self._queue = deque(p for p in self._queue if p.waiting)
        return pending

    def flush(self) -> None:
        """Stop waiting for company (no more is coming: the server is shutting down)."""
        self.max_wait_s = 0.0
        if self._arrived is not None:
            self._arrived.set()

    def submit(self, sequences: list[list[int]]) -> list[asyncio.Future]:
        """Queue token sequences; returns one future per sequence (its raw reward). Raises ``QueueFull``."""
        if self._worker is None or self._worker.done():
            raise RuntimeError("the batcher is not running")
        if self._waiting + len(sequences) > self.max_queue:
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        gap = now - self._last_arrival
        self._gap = gap if self._gap == float("inf") else 0.8 * self._gap + 0.2 * min(gap, 1.0)
        self._last_arrival = now
        futures = []
        for ids in sequences:
            pending = _Pending(ids, loop.create_future(), now)
            self._queue.append(pending)
            futures.append(pending.future)
        self._waiting += len(sequences)
        self._arrived.set()
        return futures

    def _full(self) -> bool:
        n = len(self._queue)
        return n >= self.max_batch_items or n * max(len(p.ids) for p in self._queue) >= self.max_batch_tokens

    async def _collect(self) -> list[_Pending]:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            worth_it = self.wait_policy == "always" or self._gap < self.max_wait_s
            while worth_it and self._queue and not self._full():
                timeout = self._queue[0].enqueued + self.max_wait_s - time.monotonic()  # flush() may end it early
                if timeout <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            if self._queue:  # else every waiting item was discarded while we waited for company
                break
        taken = list(self._queue)
        self._queue.clear()
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            taken = await self._collect()
            for p in taken:
                if p.future.done():  # cancelled by its request: no forward
                    self._leave(p)
            live = self._round = [p for p in taken if p.waiting]
            plan = plan_batches([len(p.ids) for p in live], self.max_batch_tokens, self.max_batch_items,
                                self.overhead_tokens)
            for batch_idx in plan:
                batch = [live[i] for i in batch_idx if not live[i].future.done()]  # abandoned since the round began
                for p in (live[i] for i in batch_idx):
                    self._leave(p)
                if batch:
                    await self._forward(loop, batch)
            self._round = []

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        sequences = [p.ids for p in batch]
        start = time.perf_counter()
        try:
            rewards = await loop.run_in_executor(self._executor, self.score_fn, sequences)
        except Exception as exc:  # a failed forward fails its own requests, never the worker
            log.error("forward of %d items failed: %s", len(batch), type(exc).__name__)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        seconds = time.perf_counter() - start
        for p, reward in zip(batch, rewards):
            if not p.future.done():
                p.future.set_result(reward)
        rate = len(batch) / max(seconds, 1e-6)
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        if self.on_batch is not None:
            longest = max(len(s) for s in sequences)
            self.on_batch(len(batch), longest * len(batch), sum(len(s) for s in sequences), seconds)
