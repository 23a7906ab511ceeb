"""The micro-batcher in-process: batch planning, admission, failures, waiting policy."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward_models.batching import MicroBatcher, QueueFull, pass_overhead, plan_batches


@pytest.mark.parametrize("lengths,budget,cap", [([5, 1, 3, 2, 4], 8, 10), ([10] * 7, 30, 2), ([100, 1, 1], 50, 8), ([], 8, 4)])
def test_plan_batches_respects_budget_and_covers_every_item(lengths, budget, cap):
    batches = plan_batches(lengths, budget, cap)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= cap
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget
    order = [lengths[i] for b in batches for i in b]
    assert order == sorted(order)  # shortest first: similar lengths share a batch, little padding


def plan_cost(lengths, batches, overhead):
    return sum(overhead + len(b) * max(lengths[i] for i in b) for b in batches)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(1, 60), max_size=8), overhead=st.floats(0, 200), cap=st.integers(1, 5),
       budget=st.integers(1, 240))
def test_planned_batches_cost_no_more_than_any_other_cut(lengths, overhead, cap, budget):
    batches = plan_batches(lengths, budget, cap, overhead)
    if not lengths:
        assert batches == []
        return
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= cap and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget) for b in batches)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = math.inf
    for mask in range(2 ** (len(order) - 1)):  # every way to cut the sorted items into runs
        cuts = [0] + [k + 1 for k in range(len(order) - 1) if mask >> k & 1] + [len(order)]
        runs = [order[a:b] for a, b in zip(cuts, cuts[1:])]
        if all(len(r) <= cap and (len(r) == 1 or len(r) * max(lengths[i] for i in r) <= budget) for r in runs):
            best = min(best, plan_cost(lengths, runs, overhead))
    assert plan_cost(lengths, batches, overhead) <= best + 1e-6


def test_pass_overhead_from_two_timings():
    a, b = 1e-3, 2e-5  # 1 ms per pass, 20 us per padded token: a pass costs as much as 50 tokens
    assert pass_overhead((16, 1024), (a + 16 * b, a + 1024 * b)) == pytest.approx(50)
    assert pass_overhead((16, 1024), (1e-3, 1e-3)) is None  # padding is free: fill batches
    assert pass_overhead((16, 1024), (16 * b, 1024 * b)) == 16.0  # never below the floor


def _run(coro):
    return asyncio.run(coro)


def test_batcher_answers_each_future_and_refuses_when_full():
    calls = []

    def fn(batch):
        calls.append(len(batch))
        return [float(sum(ids)) for ids in batch]

    async def go():
        batcher = MicroBatcher(fn, max_batch_tokens=12, max_batch_items=4, max_wait_s=0.05, max_queue=6,
                               wait_policy="always")
        await batcher.start()
        futures = batcher.submit([[1], [2, 2], [3, 3, 3]]) + batcher.submit([[4] * 4, [5]])
        with pytest.raises(QueueFull) as refused:
            batcher.submit([[6], [7]])  # 5 waiting + 2 > 6: all or nothing
        assert refused.value.retry_after >= 1 and batcher.depth == 5
        values = await asyncio.gather(*futures)
        await batcher.close()
        return values

    assert _run(go()) == [1.0, 4.0, 9.0, 16.0, 5.0]
    assert sum(calls) == 5 and max(calls) <= 4 and len(calls) < 5


def test_batcher_survives_a_failing_forward_and_skips_abandoned_items():
    seen = []

    def fn(batch):
        seen.extend(batch)
        if [0] in batch:
            raise RuntimeError("boom")
        return [1.0] * len(batch)

    async def go():
        batcher = MicroBatcher(fn, max_batch_items=1, max_wait_s=0.001)
        await batcher.start()
        with pytest.raises(RuntimeError):
            await batcher.submit([[0]])[0]
        abandoned = batcher.submit([[7]])[0]
        abandoned.cancel()  # e.g. a request that timed out before its item reached the model
        value = await batcher.submit([[1]])[0]
        await batcher.close()
        return value

    assert _run(go()) == 1.0 and [7] not in seen


def test_closing_fails_every_waiting_future():
    release = threading.Event()

    async def go():
        batcher = MicroBatcher(lambda b: release.wait(10) and [0.0] * len(b), max_batch_items=1, max_wait_s=0.001)
        await batcher.start()
        futures = batcher.submit([[1], [2]]) + batcher.submit([[3]])  # one running, two waiting
        await asyncio.sleep(0.05)
        await batcher.close()
        release.set()
        return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = _run(go())
    assert all(isinstance(o, RuntimeError | asyncio.CancelledError) for o in outcomes), outcomes


def test_adaptive_wait_does_not_delay_a_sequential_client():
    async def go(policy):
        batcher = MicroBatcher(lambda b: [0.0] * len(b), max_wait_s=0.2, wait_policy=policy)
        await batcher.start()
        start = time.perf_counter()
        for _ in range(3):
            await batcher.submit([[1]])[0]
            await asyncio.sleep(0.25)  # a client that thinks between requests
        await batcher.close()
        return time.perf_counter() - start - 0.75

    assert _run(go("adaptive")) < 0.15
    assert _run(go("always")) >= 0.55


def test_limits_are_validated():
    from reward_models.api import Limits

    with pytest.raises(ValueError, match="max_queue"):
        Limits(max_items=10, max_queue=5)
    with pytest.raises(ValueError, match="positive"):
        Limits(max_body_bytes=0)
    assert json.loads(json.dumps(Limits().__dict__))["api_key_env"] == "RLHF_API_KEY"


def test_discarded_items_are_never_computed_and_free_their_room_at_once():
    seen, started, release = [], threading.Event(), threading.Event()

    def fn(batch):
        seen.extend(batch)
        started.set()
        release.wait(10)
        return [0.0] * len(batch)

    async def go():
        batcher = MicroBatcher(fn, max_batch_items=1, max_wait_s=0.001, max_queue=3)
        await batcher.start()
        first = batcher.submit([[1], [2], [3]])  # one round: [1] runs, [2] and [3] wait for their turn
        await asyncio.to_thread(started.wait, 10)
        assert batcher.discard(first[1:]) == 2
        second = batcher.submit([[4], [5]])  # the queue had room again at once
        with pytest.raises(QueueFull):
            batcher.submit([[6], [7]])
        release.set()
        values = await asyncio.gather(first[0], *second)
        await batcher.close()
        return values

    assert _run(go()) == [0.0, 0.0, 0.0] and [2] not in seen and [3] not in seen


def test_flush_ends_the_wait_for_company():
    async def go():
        batcher = MicroBatcher(lambda b: [1.0] * len(b), max_wait_s=30, wait_policy="always")
        await batcher.start()
        future = batcher.submit([[1]])[0]
        await asyncio.sleep(0.05)
        batcher.flush()  # shutting down: no more company is coming
        value = await asyncio.wait_for(future, 10)
        await batcher.close()
        return value

    assert _run(go()) == 1.0
