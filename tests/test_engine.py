"""The engine in-process, on the real embedqa backend (golden tiny checkpoint): cross-request
batching, order, nothing lost or duplicated, fairness, back-pressure, cancellation, failure
isolation and health. Failures are injected by a wrapper around the real backend (out of
memory above a batch size, an error for one marked input, a device that fails every pass, a
result the engine cannot hand out); the model itself always runs.

Fairness is measured in micro-batches and padded tokens, never in seconds: the wrapper submits
the next request of a stream from inside each forward pass (the device thread), so the arrival
pattern, and so the schedule, is the same on a loaded machine as on an idle one."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from embed_serving.backend import Backend, Prepared
from embed_serving.engine import DEAD_RETRY_AFTER_S, ClientGone, Engine, EngineLimits
from embed_serving.errors import RequestError
from embed_serving.models.embedqa import EmbedQABackend
from embed_serving.request import Item


class Spy(Backend):
    """The real backend, recording every batch; can hold the device thread or inject
    failures."""

    def __init__(self, real: EmbedQABackend) -> None:
        self.real = real
        self.caps, self.device, self.dtype = real.caps, real.device, real.dtype
        self.max_positions = real.max_positions
        self.batches: list[list[Prepared]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.oom_above: int | None = None
        self.poison: Prepared | None = None
        # Called at the start of every pass with (its index, its batch), on the device thread.
        self.on_forward: Callable[[int, list[Prepared]], None] | None = None
        self.broken: BaseException | None = None  # raised by every pass from now on
        self.short_output: Prepared | None = None  # its pass returns one output too few

    def prepare(self, items, kind, instruction):
        return self.real.prepare(items, kind, instruction)

    def forward(self, batch: list[Prepared]) -> list[torch.Tensor]:
        self.entered.set()
        self.gate.wait(timeout=60)
        if self.on_forward is not None:
            self.on_forward(len(self.batches), batch)
        self.batches.append(list(batch))
        if self.broken is not None:
            raise self.broken
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise torch.OutOfMemoryError("injected: batch too big")
        if self.poison is not None and any(p is self.poison for p in batch):
            raise ValueError("injected failure")
        if self.short_output is not None and any(p is self.short_output for p in batch):
            return self.real.forward(batch)[:-1]
        return self.real.forward(batch)


@pytest.fixture(scope="module")
def real(golden: Path) -> EmbedQABackend:
    return EmbedQABackend(golden / "embedqa-1b-v2" / "checkpoint")


@pytest.fixture
def spy(real) -> Spy:
    return Spy(real)


@pytest.fixture
def make_engine(spy) -> Iterator:
    engines: list[Engine] = []

    def make(**limits) -> Engine:
        engine = Engine(spy, EngineLimits(**limits))
        engines.append(engine)
        return engine

    yield make
    spy.gate.set()
    for engine in engines:
        engine.close()


def texts(n: int, words: int = 3, tag: str = "t") -> list[str]:
    return [" ".join(f"{tag}{i}w{j}" for j in range(words + i % 5)) for i in range(n)]


def prepare(real: EmbedQABackend, strings: list[str], kind: str = "passage") -> list[Prepared]:
    return real.prepare([Item(text=s) for s in strings], kind, None)  # type: ignore[arg-type]


def alone(real: EmbedQABackend, inputs: list[Prepared]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [real.forward([p])[0] for p in inputs]


def test_requests_share_batches_in_order_nothing_lost(spy, real, make_engine) -> None:
    engine = make_engine(batch_max_items=64)
    requests = [prepare(real, texts(1 + r % 4, tag=f"r{r}x")) for r in range(24)]
    spy.gate.clear()  # the device is busy: everything below queues up
    jobs = [engine.submit(inputs) for inputs in requests]
    spy.gate.set()
    for inputs, job in zip(requests, jobs, strict=True):
        outputs = job.future.result(timeout=60)
        assert len(outputs) == len(inputs)
        for got, want in zip(outputs, alone(real, inputs), strict=True):
            assert torch.allclose(got, want, atol=1e-5)
    # Fewer forward passes than requests: they were batched together ...
    assert len(spy.batches) < len(requests)
    assert any(
        len({id(r) for r in requests for p in batch if any(p is q for q in r)}) > 1
        for batch in spy.batches
    )
    # ... and every input ran exactly once.
    ran = [id(p) for batch in spy.batches for p in batch]
    assert sorted(ran) == sorted(id(p) for r in requests for p in r)


def test_batches_respect_item_and_token_caps(spy, real, make_engine) -> None:
    engine = make_engine(batch_max_items=5, batch_max_tokens=60)
    inputs = prepare(real, texts(40, words=6))
    engine.submit(inputs).future.result(timeout=60)
    for batch in spy.batches:
        longest = max(len(p.input_ids) for p in batch)
        shortest = min(len(p.input_ids) for p in batch)
        assert len(batch) <= 5
        assert len(batch) == 1 or len(batch) * longest <= 60
        assert 2 * shortest >= longest  # no row more than half padding


def test_a_query_arriving_mid_bulk_waits_at_most_one_batch(spy, real, make_engine) -> None:
    engine = make_engine(batch_max_items=4)
    bulk_inputs = prepare(real, texts(64, words=20, tag="bulk"))
    bulk = engine.submit(bulk_inputs)
    spy.gate.clear()
    spy.entered.clear()
    spy.entered.wait(timeout=60)  # the bulk request holds the device
    n_before = len(spy.batches)
    query_inputs = prepare(real, ["what is x?"], "query")
    query = engine.submit(query_inputs)
    spy.gate.set()
    query.future.result(timeout=60)
    # The batch in flight when it arrived, then the query's own.
    position = next(k for k, b in enumerate(spy.batches) if any(p is query_inputs[0] for p in b))
    assert position <= n_before + 1
    # Its pass is not filled up with bulk passages: it costs one short forward, not a full one.
    assert not any(p is q for p in spy.batches[position] for q in bulk_inputs)
    assert not bulk.future.done() or len(spy.batches) > position + 1
    bulk.future.result(timeout=60)


def test_full_queue_is_429_with_retry_after(spy, real, make_engine) -> None:
    engine = make_engine(max_queue_tokens=200)
    spy.gate.clear()
    first = engine.submit(prepare(real, texts(4, words=8)))  # starts running, holds the device
    spy.entered.wait(timeout=60)
    queued = engine.submit(prepare(real, texts(10, words=8)))
    with pytest.raises(RequestError) as refused:
        engine.submit(prepare(real, texts(10, words=8)))
    assert refused.value.status == 429
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert "MAX_QUEUE_TOKENS" in refused.value.message
    spy.gate.set()
    assert len(first.future.result(timeout=60)) == 4
    assert len(queued.future.result(timeout=60)) == 10
    # Once drained, the queue admits again; a request bigger than the whole queue runs alone.
    assert len(engine.submit(prepare(real, texts(30, words=8))).future.result(timeout=60)) == 30


def test_cancelled_request_is_never_computed(spy, real, make_engine) -> None:
    engine = make_engine()
    spy.gate.clear()
    engine.submit(prepare(real, ["holding the device"]))
    spy.entered.wait(timeout=60)
    doomed_inputs = prepare(real, texts(20, tag="doomed"))
    doomed = engine.submit(doomed_inputs)
    engine.cancel(doomed)
    survivor = engine.submit(prepare(real, ["still here"]))
    spy.gate.set()
    assert len(survivor.future.result(timeout=60)) == 1
    assert doomed.future.cancelled()
    assert not any(p is q for b in spy.batches for p in b for q in doomed_inputs)
    assert engine.queue_depth() == (0, 0)


def test_client_gone_while_waiting_drops_the_work(spy, real, make_engine) -> None:
    engine = make_engine(disconnect_poll_s=0.01)
    spy.gate.clear()
    engine.submit(prepare(real, ["holding the device"]))
    spy.entered.wait(timeout=60)
    inputs = prepare(real, texts(10, tag="gone"))

    async def gone() -> bool:
        return True

    with pytest.raises(ClientGone):
        asyncio.run(engine.embed(inputs, disconnected=gone))
    spy.gate.set()
    engine.submit(prepare(real, ["after"])).future.result(timeout=60)
    assert not any(p is q for b in spy.batches for p in b for q in inputs)


def test_out_of_memory_splits_and_only_an_input_too_big_alone_fails(spy, real, make_engine) -> None:
    engine = make_engine(batch_max_items=16)
    inputs = prepare(real, texts(16))
    spy.oom_above = 3  # injected: any forward of more than 3 inputs runs out of memory
    outputs = engine.submit(inputs).future.result(timeout=60)
    for got, want in zip(outputs, alone(real, inputs), strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    assert max(len(b) for b in spy.batches) == 16  # tried whole first
    spy.oom_above = 0  # now even one input does not fit
    with pytest.raises(RequestError) as refused:
        engine.submit(prepare(real, ["too big"])).future.result(timeout=60)
    assert refused.value.status == 413
    spy.oom_above = None
    assert len(engine.submit(prepare(real, ["fine again"])).future.result(timeout=60)) == 1


def test_one_failing_request_never_touches_the_others(spy, real, make_engine) -> None:
    engine = make_engine()
    bad_inputs = prepare(real, texts(3, tag="bad"))
    spy.poison = bad_inputs[1]
    spy.gate.clear()
    good = [engine.submit(prepare(real, texts(3, tag=f"good{k}"))) for k in range(3)]
    bad = engine.submit(bad_inputs)
    spy.gate.set()
    with pytest.raises(ValueError, match="injected"):
        bad.future.result(timeout=60)
    for job in good:
        assert len(job.future.result(timeout=60)) == 3


def test_scoring_runs_on_the_device_thread(make_engine) -> None:
    engine = make_engine()
    assert engine.call(lambda: threading.current_thread().name).result(timeout=10) == "engine"


def padded(batch: list[Prepared]) -> int:
    """A pass's cost: rows x the longest row."""
    return len(batch) * max(len(p.input_ids) for p in batch)


def index_of(batches: list[list[Prepared]], inputs: list[Prepared]) -> list[int]:
    """The passes that ran any of `inputs`."""
    return [k for k, b in enumerate(batches) if any(p is q for p in b for q in inputs)]


def test_bulk_keeps_its_fair_share_while_queries_stream(spy, real, make_engine) -> None:
    """One new single-query request arrives during every pass (a closed stream, so at most a
    couple of requests wait beside the bulk one). Fair queuing by tokens gives the bulk request
    half of the device: it finishes within 2 x (its own tokens + one batch) of work, the README
    bound for two active requests, long before the stream ends; and every query still runs in
    the pass after the one in flight, or one bulk pass later (in batches, not seconds)."""
    budget = 128
    engine = make_engine(batch_max_tokens=budget)
    alone_inputs = prepare(real, texts(10, words=10, tag="alone"))
    engine.submit(alone_inputs).future.result(timeout=60)
    alone = sum(padded(b) for b in spy.batches)  # the bulk's cost on an idle device
    spy.batches.clear()

    stream = [prepare(real, [f"what is the query number {k} of region {k % 7}"], "query")
              for k in range(160)]  # fmt: skip
    queries: list = []
    arrived: list[int] = []

    def next_query(index: int, batch: list[Prepared]) -> None:
        if len(queries) < len(stream):
            arrived.append(index)
            queries.append(engine.submit(stream[len(queries)]))

    spy.on_forward = next_query
    bulk_inputs = prepare(real, texts(10, words=10, tag="bulk"))
    bulk = engine.submit(bulk_inputs)
    bulk.future.result(timeout=120)
    for job in queries:
        job.future.result(timeout=120)
    spy.on_forward = None

    bulk_passes = index_of(spy.batches, bulk_inputs)
    work = sum(padded(b) for b in spy.batches[: bulk_passes[-1] + 1])
    stream_tokens = sum(padded(b) for b in spy.batches) - sum(
        padded(spy.batches[k]) for k in bulk_passes
    )
    # The test can fail: the stream alone is more work than the bound (served first, as by
    # "fewest batches served first", the bulk request would end after it).
    assert stream_tokens > 2 * (alone + budget)
    assert work <= 2 * (alone + budget), (work, alone)
    assert bulk_passes[-1] < index_of(spy.batches, stream[-1])[0]
    # Queries: the pass in flight when they arrived, at most one more, then their own.
    waits = [index_of(spy.batches, q)[0] - a for q, a in zip(stream, arrived, strict=True)]
    assert max(waits) <= 2, waits
    # Nothing of the bulk request rode in a query's pass: a query's pass stays short.
    for k in range(len(spy.batches)):
        if k not in bulk_passes:
            assert padded(spy.batches[k]) <= 2 * max(len(q[0].input_ids) for q in stream)


def test_two_bulk_requests_share_the_device(spy, real, make_engine) -> None:
    """A bulk request arriving while another runs is served in turn with it, not after it: the
    first one's remaining passes and the second's interleave."""
    engine = make_engine(batch_max_tokens=128)
    first_inputs = prepare(real, texts(12, words=10, tag="first"))
    second_inputs = prepare(real, texts(12, words=10, tag="second"))
    second: list = []

    def arrive(index: int, batch: list[Prepared]) -> None:
        if index == 1:
            second.append(engine.submit(second_inputs))

    spy.on_forward = arrive
    first = engine.submit(first_inputs)
    first.future.result(timeout=120)
    second[0].future.result(timeout=120)
    spy.on_forward = None
    a, b = index_of(spy.batches, first_inputs), index_of(spy.batches, second_inputs)
    # The second started right after the pass in flight when it arrived ...
    assert b[0] == 2
    # ... and neither waited for the other to finish: from then on, until one of them is
    # done, each gets a pass at least every other pass.
    assert b[0] < a[-1] and a[-1] < b[-1]
    end = min(a[-1], b[-1])
    for passes in (a, b):
        during = [1] + [k for k in passes if 2 <= k <= end]
        assert max(j - i for i, j in itertools.pairwise(during)) <= 2, (a, b)


def test_an_error_outside_the_forward_fails_its_batch_with_500_and_the_engine_goes_on(
    spy, real, make_engine
) -> None:
    """A pass whose results cannot be handed out (one output short): its requests get a 500
    naming no internals, the engine stays healthy and serves the next request correctly."""
    engine = make_engine()
    doomed_inputs = prepare(real, texts(3, tag="doomed"))
    spy.short_output = doomed_inputs[0]
    spy.gate.clear()
    holder = engine.submit(prepare(real, ["holding the device"]))
    spy.entered.wait(timeout=60)
    doomed = engine.submit(doomed_inputs)
    spy.gate.set()
    assert len(holder.future.result(timeout=60)) == 1
    with pytest.raises(RequestError) as failed:
        doomed.future.result(timeout=60)
    assert failed.value.status == 500
    assert "internal error" in failed.value.message
    assert engine.healthy()
    after = prepare(real, texts(2, tag="after"))
    for got, want in zip(engine.submit(after).future.result(timeout=60), alone(real, after),
                         strict=True):  # fmt: skip
        assert torch.allclose(got, want, atol=1e-5)
    assert engine.queue_depth() == (0, 0)


class WorkerKilled(BaseException):
    """Not an Exception: nothing in the loop may swallow it, so the worker thread ends."""


def test_a_dead_worker_thread_fails_health_and_answers_503(spy, real, make_engine) -> None:
    engine = make_engine(disconnect_poll_s=0.01)
    spy.gate.clear()
    running = engine.submit(prepare(real, ["on the device when it dies"]))
    spy.entered.wait(timeout=60)
    queued = engine.submit(prepare(real, texts(4, tag="queued")))
    spy.broken = WorkerKilled()
    spy.gate.set()
    for job in (running, queued):
        with pytest.raises(RequestError) as refused:
            job.future.result(timeout=60)
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": str(DEAD_RETRY_AFTER_S)}
    engine._thread.join(timeout=10)
    assert not engine._thread.is_alive()
    assert not engine.healthy()
    # New work is refused at once, and so is a request waiting through `embed`.
    with pytest.raises(RequestError) as refused:
        engine.submit(prepare(real, ["new"]))
    assert refused.value.status == 503
    with pytest.raises(RequestError) as refused:
        engine.check_room(1)
    assert refused.value.status == 503
    with pytest.raises(RequestError):
        engine.call(lambda: 1).result(timeout=10)
    with pytest.raises(RequestError) as refused:
        asyncio.run(engine.embed(prepare(real, ["new"])))
    assert refused.value.status == 503
    assert engine.queue_depth() == (0, 0)


def test_a_device_that_fails_every_pass_stops_the_engine(spy, real, make_engine) -> None:
    """A sticky device error (every pass fails from some point on): after
    max_consecutive_failures passes in a row the engine stops; the requests whose own pass
    failed got that error (500), every other one a 503 with Retry-After; none hangs."""
    engine = make_engine(max_consecutive_failures=3)
    assert len(engine.submit(prepare(real, ["fine"])).future.result(timeout=60)) == 1
    spy.gate.clear()
    holder = engine.submit(prepare(real, ["holding the device"]))
    spy.entered.wait(timeout=60)
    jobs = [holder] + [engine.submit(prepare(real, texts(2, tag=f"r{k}x"))) for k in range(6)]
    spy.broken = RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    spy.gate.set()
    statuses = []
    for job in jobs:
        try:
            job.future.result(timeout=60)
            statuses.append(200)
        except RequestError as e:
            assert e.status == 503 and e.headers == {"Retry-After": str(DEAD_RETRY_AFTER_S)}
            assert "3 micro-batches failed in a row" in e.message
            statuses.append(503)
        except RuntimeError as e:
            assert "illegal memory access" in str(e)
            statuses.append(500)
    # 3 failed passes: the holder's, then the six queued requests' shared pass and the first
    # of them re-run alone; everyone else is told to go elsewhere.
    assert statuses.count(500) <= 2 and statuses.count(503) >= 5, statuses
    assert 200 not in statuses
    assert len(spy.batches) == 1 + 3
    assert not engine.healthy()
    with pytest.raises(RequestError) as refused:
        engine.submit(prepare(real, ["new"]))
    assert refused.value.status == 503
    engine._thread.join(timeout=10)
    assert not engine._thread.is_alive()


def test_failures_with_successes_between_keep_the_engine_healthy(spy, real, make_engine) -> None:
    """Only failures in a row count: bad requests that fail their own passes, with good ones
    between, never stop the engine."""
    engine = make_engine(max_consecutive_failures=2)
    for k in range(4):
        bad_inputs = prepare(real, [f"bad {k}"])
        spy.poison = bad_inputs[0]
        with pytest.raises(ValueError, match="injected"):
            engine.submit(bad_inputs).future.result(timeout=60)
        assert len(engine.submit(prepare(real, [f"good {k}"])).future.result(timeout=60)) == 1
    assert engine.healthy()
