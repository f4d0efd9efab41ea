"""The engine in-process, on the real embedqa backend (golden tiny checkpoint): cross-request
batching, order, nothing lost or duplicated, fairness, back-pressure, cancellation, and
failure isolation. Failures are injected by a wrapper around the real backend (out of memory
above a batch size, an error for one marked input); the model itself always runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from embed_serving.backend import Backend, Prepared
from embed_serving.engine import ClientGone, Engine, EngineLimits
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

    def prepare(self, items, kind, instruction):
        return self.real.prepare(items, kind, instruction)

    def forward(self, batch: list[Prepared]) -> list[torch.Tensor]:
        self.entered.set()
        self.gate.wait(timeout=60)
        self.batches.append(list(batch))
        if self.oom_above is not None and len(batch) > self.oom_above:
            raise torch.OutOfMemoryError("injected: batch too big")
        if self.poison is not None and any(p is self.poison for p in batch):
            raise ValueError("injected failure")
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
