"""The engine: one worker thread owns the device, and every request's inputs wait in one queue.

Requests arrive already tokenised (`Prepared`). Whenever the device is free, the worker forms
the next micro-batch from everything queued, across requests: no waiting window, batches simply
grow while the device is busy. The rules, in one place (`_next_batch`):

* Fairness: requests are visited in order of (micro-batches already served, arrival), and the
  batch is anchored on the first one's longest remaining input; only requests served as often
  as the anchor join it. A request that just arrived has been served 0 times, so a short query
  that lands in the middle of a bulk request gets the very next micro-batch, shared with other
  new requests only: it waits for the batch in flight plus its own short pass.
* Length-aware: inputs join while the batch stays under the item cap and the padded-token
  budget (items x longest) and no row would be more than half padding. Each request's inputs
  are kept longest first, so its batches come out length-sorted as `plan_batches` would make.
* Back-pressure: the queue holds at most `max_queue_tokens` tokens; a request that does not fit
  is refused with 429 and `Retry-After` (an empty queue always admits one request, so a request
  bigger than the queue can still run, alone).
* Outputs leave the device after every micro-batch, so device memory is bounded by the batch
  budget, not by the request.
* Failure isolation: out of memory splits the batch in halves and retries them (one input that
  cannot run alone fails its request with 413); any other error in a batch that mixes requests
  re-runs each request's part alone, so one request's failure never touches the others.
* Cancellation: `cancel` drops a request's queued inputs (a client that hung up).

Other device work (scoring) runs on the same thread through `call`, between micro-batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from embed_serving import metrics
from embed_serving.backend import Backend, Prepared
from embed_serving.errors import RequestError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineLimits:
    batch_max_items: int = 64  # BATCH_MAX_ITEMS
    batch_max_tokens: int = 32768  # BATCH_MAX_TOKENS: items x longest per forward pass
    max_queue_tokens: int = 1_048_576  # MAX_QUEUE_TOKENS
    # How often a waiting request checks whether its client is still there.
    disconnect_poll_s: float = 0.25


class ClientGone(Exception):
    """The client hung up; its queued work was dropped."""


class Job:
    """One request's inputs inside the engine."""

    def __init__(self, seq: int, inputs: Sequence[Prepared], max_items: int) -> None:
        self.seq = seq
        self.inputs = inputs
        self.max_items = max_items
        self.lengths = [len(p.input_ids) for p in inputs]
        # Not yet batched, longest first (ties in input order).
        self.waiting = sorted(range(len(inputs)), key=lambda i: (-self.lengths[i], i))
        self.waiting_tokens = sum(self.lengths)
        self.outputs: list[torch.Tensor | None] = [None] * len(inputs)
        self.missing = len(inputs)
        self.served = 0  # micro-batches this job has had a share of: the fairness key
        self.future: concurrent.futures.Future[list[torch.Tensor]] = concurrent.futures.Future()


class Engine:
    def __init__(self, backend: Backend, limits: EngineLimits) -> None:
        self.backend = backend
        self.limits = limits
        self._cond = threading.Condition()
        self._jobs: list[Job] = []  # with inputs still waiting
        self._tasks: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._queued_tokens = 0
        self._queued_inputs = 0
        self._seq = itertools.count()
        self._closed = False
        self._tokens_per_s = 0.0  # recent throughput, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # ---- the request side (any thread) --------------------------------------------------

    def submit(self, inputs: Sequence[Prepared], max_items: int | None = None) -> Job:
        """Queue one request's inputs; `job.future` gets their outputs (CPU float32, input
        order). Raises a 429 RequestError when the queue is full."""
        cap = min(max_items or self.limits.batch_max_items, self.limits.batch_max_items)
        job = Job(next(self._seq), inputs, cap)
        if not inputs:
            job.future.set_result([])
            return job
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._queued_tokens and (
                self._queued_tokens + job.waiting_tokens > self.limits.max_queue_tokens
            ):
                metrics.REJECTED.inc()
                raise self._queue_full(job.waiting_tokens)
            self._jobs.append(job)
            self._queued_tokens += job.waiting_tokens
            self._queued_inputs += len(inputs)
            self._publish_queue()
            self._cond.notify()
        return job

    def check_room(self, inputs: int) -> None:
        """Refuse early (429) when the queue cannot take even `inputs` one-token inputs: spares
        tokenising a request that `submit` would refuse anyway."""
        with self._cond:
            if self._queued_tokens and self._queued_tokens + inputs > self.limits.max_queue_tokens:
                metrics.REJECTED.inc()
                raise self._queue_full(inputs)

    def cancel(self, job: Job) -> None:
        """Drop a job's queued inputs; inputs already in a running batch finish and are thrown
        away. Its future is cancelled."""
        with self._cond:
            self._drop(job)
        job.future.cancel()

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the device thread, before the next micro-batch."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            self._tasks.append((fn, future))
            self._cond.notify()
        return future

    async def embed(
        self,
        inputs: Sequence[Prepared],
        max_items: int | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> list[torch.Tensor]:
        """`submit` for the event loop: waits for the outputs, polling `disconnected` so that a
        client that hangs up has its queued inputs dropped (raises ClientGone)."""
        job = self.submit(inputs, max_items)
        waiter = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=self.limits.disconnect_poll_s)
                if done:
                    return waiter.result()
                if disconnected is not None and await disconnected():
                    metrics.DROPPED.inc(job.missing)
                    raise ClientGone
        finally:
            if not job.future.done():
                self.cancel(job)

    def queue_depth(self) -> tuple[int, int]:
        """(inputs, tokens) waiting."""
        with self._cond:
            return self._queued_inputs, self._queued_tokens

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the device thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._jobs or self._tasks or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                task = self._tasks.popleft() if self._tasks else None
                batch = [] if task else self._next_batch()
            if task is not None:
                fn, future = task
                if future.set_running_or_notify_cancel():
                    try:
                        with torch.inference_mode():
                            future.set_result(fn())
                    except BaseException as e:  # delivered to the caller, who re-raises
                        future.set_exception(e)
            elif batch:
                self._run(batch)

    def _next_batch(self) -> list[tuple[Job, int]]:
        """Take the next micro-batch off the queue (caller holds the lock)."""
        max_items, max_tokens = self.limits.batch_max_items, self.limits.batch_max_tokens
        batch: list[tuple[Job, int]] = []
        longest, shortest = 0, math.inf
        jobs = sorted(self._jobs, key=lambda j: (j.served, j.seq))
        level = jobs[0].served if jobs else 0
        for job in jobs:
            if job.served != level:
                # Only requests at the anchor's level share its batch: a new query's batch is
                # not filled up with bulk passages, so it costs one short pass, not a full one.
                break
            taken: list[int] = []
            for i in job.waiting:
                if len(batch) >= max_items or len(taken) >= job.max_items:
                    break
                n = job.lengths[i]
                if not batch:  # the anchor: always taken, even if over the budget alone
                    batch.append((job, i))
                    taken.append(i)
                    longest = shortest = n
                    continue
                if 2 * n < longest:
                    break  # longest first: the rest of this job is shorter still
                top = max(longest, n)
                if top > 2 * min(shortest, n) or (len(batch) + 1) * top > max_tokens:
                    continue
                batch.append((job, i))
                taken.append(i)
                longest, shortest = top, min(shortest, n)
            if taken:
                job.served += 1
                picked = set(taken)
                job.waiting = [i for i in job.waiting if i not in picked]
                tokens = sum(job.lengths[i] for i in taken)
                job.waiting_tokens -= tokens
                self._queued_tokens -= tokens
                self._queued_inputs -= len(taken)
            if len(batch) >= max_items:
                break
        self._jobs = [j for j in self._jobs if j.waiting]
        self._publish_queue()
        return batch

    def _run(self, batch: list[tuple[Job, int]]) -> None:
        live = [(job, i) for job, i in batch if not job.future.done()]
        if live:
            self._forward(live)

    def _forward(self, batch: list[tuple[Job, int]]) -> None:
        prepared = [job.inputs[i] for job, i in batch]
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                outputs = self._to_host(self.backend.forward(prepared))
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) == 1:
                job, i = batch[0]
                self._fail(job, RequestError(
                    f"input {i} ({job.lengths[i]} tokens) does not fit in device memory even "
                    "alone; send it shorter (truncate) or lower its image size",
                    status=413,
                ))  # fmt: skip
                return
            metrics.OOM_SPLITS.inc()
            half = len(batch) // 2
            log.warning("out of device memory on %d inputs: retrying in halves", len(batch))
            self._forward(batch[:half])
            self._forward(batch[half:])
            return
        except Exception as e:
            jobs = list(dict.fromkeys(job for job, _ in batch))
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return
            log.warning("a batch of %d requests failed; re-running each alone", len(jobs))
            for job in jobs:
                self._forward([(j, i) for j, i in batch if j is job])
            return
        elapsed = time.perf_counter() - start
        self._record(prepared, elapsed)
        for (job, i), out in zip(batch, outputs, strict=True):
            if job.future.done():
                continue  # cancelled or failed meanwhile
            job.outputs[i] = out
            job.missing -= 1
            if job.missing == 0:
                _settle(job.future, result=job.outputs)

    @staticmethod
    def _to_host(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every output to CPU float32 in one transfer, so nothing of the request stays on the
        device after its micro-batch."""
        if not outputs or outputs[0].device.type == "cpu":
            return [o.float() for o in outputs]
        flat = torch.cat([o.reshape(-1) for o in outputs]).to("cpu", torch.float32)
        pieces = flat.split([o.numel() for o in outputs])
        return [p.view(o.shape) for p, o in zip(pieces, outputs, strict=True)]

    def _fail(self, job: Job, error: BaseException) -> None:
        with self._cond:
            self._drop(job)
        _settle(job.future, error=error)

    def _drop(self, job: Job) -> None:
        """Remove a job's waiting inputs from the queue (caller holds the lock)."""
        if job in self._jobs:
            self._jobs.remove(job)
            self._queued_tokens -= job.waiting_tokens
            self._queued_inputs -= len(job.waiting)
            job.waiting, job.waiting_tokens = [], 0
            self._publish_queue()

    def _record(self, prepared: list[Prepared], elapsed: float) -> None:
        lengths = [len(p.input_ids) for p in prepared]
        real, padded = sum(lengths), len(lengths) * max(lengths)
        metrics.BATCH_SIZE.observe(len(lengths))
        metrics.BATCH_PADDING.observe(1 - real / padded)
        metrics.FORWARD_SECONDS.observe(elapsed)
        metrics.TOKENS.inc(real)
        metrics.INPUTS.inc(len(lengths))
        rate = real / max(elapsed, 1e-6)
        old = self._tokens_per_s
        self._tokens_per_s = rate if not old else 0.8 * old + 0.2 * rate

    def _publish_queue(self) -> None:
        metrics.QUEUE_INPUTS.set(self._queued_inputs)
        metrics.QUEUE_TOKENS.set(self._queued_tokens)

    def _queue_full(self, tokens: int) -> RequestError:
        # Roughly how long the queue takes to drain at the recent rate, within [1, 60] s.
        wait = self._queued_tokens / self._tokens_per_s if self._tokens_per_s else 1.0
        retry = max(1, min(60, math.ceil(wait)))
        return RequestError(
            f"the server is busy: {self._queued_tokens} tokens are queued and this request "
            f"adds {tokens}, the limit is {self.limits.max_queue_tokens} (MAX_QUEUE_TOKENS); "
            f"retry after {retry} s",
            status=429,
            code="queue_full",
            headers={"Retry-After": str(retry)},
        )


def _settle(
    future: concurrent.futures.Future[Any], result: Any = None, error: BaseException | None = None
) -> None:
    """Resolve a job's future unless the request side cancelled it meanwhile (a race that is
    fine to lose: nobody waits for the result any more)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
