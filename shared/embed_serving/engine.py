"""The engine: one worker thread owns the device, and every request's inputs wait in one queue.

Requests arrive already tokenised (`Prepared`). Whenever the device is free, the worker forms
the next micro-batch from everything queued, across requests: no waiting window, batches simply
grow while the device is busy. The rules, in one place (`_next_batch`):

* Fairness: fair queuing by tokens (start-time fair queuing on a virtual clock). Each request
  has a tag, the virtual time of its next batch; a batch charges each request in it the padded
  tokens it used (its rows x the batch's longest row), and advances the clock by the batch's
  padded tokens divided by the number of requests waiting. The batch is anchored on the lowest
  tag (oldest first on ties). A new request starts at the clock of the batch in flight, not
  at 0: it goes ahead of requests that already had their share (so a short query that lands in
  the middle of a bulk request gets the very next micro-batch), but never ahead of one that is
  owed service, and a stream of newcomers cannot starve an old request: the clock moves on
  with every batch they get, and the old request's turn comes once it passes that request's
  tag. Device time is so shared equally by the requests waiting, whatever their size; the
  bounds are in the README ("How requests are served").
* Who shares the anchor's batch: requests whose tag is below the clock (owed service now) or
  below the anchor's own next tag (due before its next turn anyway). A request that is ahead
  of its share does not fill up a query's batch: the query costs one short pass, not a full one.
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
* Health: the worker survives any exception (a batch that fails outside the model fails its
  requests with 500, logged once). If the worker thread ends anyway, or `max_consecutive_failures`
  forward passes fail in a row (a broken device), the engine is dead: `healthy()` turns false
  (Truss's `is_healthy`, so the platform replaces the replica), and every queued and new
  request gets 503 with `Retry-After`, never a hang.
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
    # ENGINE_MAX_CONSECUTIVE_FAILURES: forward passes failing in a row (no success between)
    # after which the device is taken for broken and the engine stops.
    max_consecutive_failures: int = 5
    # How often a waiting request checks whether its client is still there.
    disconnect_poll_s: float = 0.25


# What a 503 from a dead engine asks the client to wait: the platform's health check has to
# fail and another replica take the traffic, which takes seconds, not minutes.
DEAD_RETRY_AFTER_S = 10


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
        # Fair queuing: the virtual time of this job's next batch (set by `Engine.submit`,
        # advanced by the padded tokens each batch charges it).
        self.tag = 0.0
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
        # Fair queuing's virtual clock: where the batch in flight started (a new job's tag) and
        # where the next one starts (jobs tagged below it are owed service).
        self._vstart = 0.0
        self._vnow = 0.0
        self._failures = 0  # forward passes failed in a row
        self._dead: str | None = None  # why the engine stopped, once it has
        self._running: list[Job] = []  # the jobs of the batch on the device
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
            if not self.healthy():
                raise self._unavailable()
            if self._queued_tokens and (
                self._queued_tokens + job.waiting_tokens > self.limits.max_queue_tokens
            ):
                metrics.REJECTED.inc()
                raise self._queue_full(job.waiting_tokens)
            job.tag = self._vstart
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
            if not self.healthy():
                raise self._unavailable()
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
            if not self.healthy():
                future.set_exception(self._unavailable())
                return future
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
                if not self.healthy():
                    # Normally the engine settles every job as it stops; this covers a worker
                    # thread that ended without doing so: a 503, never a hang.
                    raise self._unavailable()
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

    def healthy(self) -> bool:
        """False once the engine has stopped for good (its worker thread ended, or the device
        failed `max_consecutive_failures` passes in a row): the replica should be replaced."""
        return self._dead is None and self._thread.is_alive()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the device thread ---------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not (self._closed or self._dead):
                self._step()
        except BaseException as e:  # the thread ends: make it known, settle everything
            log.critical("the engine's worker thread died", exc_info=True)
            self._die("its worker thread died", f"{type(e).__name__}: {e}")

    def _step(self) -> None:
        """One task or one micro-batch. An exception that escapes it (a bug outside the model:
        recording, handing out) fails only the requests of its batch, with 500, and the
        loop goes on."""
        batch: list[tuple[Job, int]] = []
        try:
            with self._cond:
                while not (self._jobs or self._tasks or self._closed or self._dead):
                    self._cond.wait()
                if self._closed or self._dead:
                    return
                task = self._tasks.popleft() if self._tasks else None
                batch = [] if task else self._next_batch()
                self._running = list(dict.fromkeys(job for job, _ in batch))
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
            # (A BaseException leaves this set: the thread ends and `_die` settles them.)
            self._running = []
        except Exception as e:
            jobs = list(dict.fromkeys(job for job, _ in batch))
            log.exception("a micro-batch of %d requests failed outside the model", len(jobs))
            for job in jobs:
                self._fail(job, RequestError(
                    f"internal error while embedding this request ({type(e).__name__}); the "
                    "server log has the details",
                    status=500,
                    code="internal_error",
                ))  # fmt: skip
            self._running = []
            self._failed(e)

    def _next_batch(self) -> list[tuple[Job, int]]:
        """Take the next micro-batch off the queue (caller holds the lock)."""
        max_items, max_tokens = self.limits.batch_max_items, self.limits.batch_max_tokens
        batch: list[tuple[Job, int]] = []
        rows: dict[Job, int] = {}
        longest, shortest = 0, math.inf
        jobs = sorted(self._jobs, key=lambda j: (j.tag, j.seq))
        join_below = math.inf  # set once the anchor's part is taken
        for job in jobs:
            if job.tag >= join_below:
                # Sorted by tag: no later job is due either. A query's batch is not filled up
                # with the passages of a request that is ahead of its share.
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
                rows[job] = len(taken)
                picked = set(taken)
                job.waiting = [i for i in job.waiting if i not in picked]
                tokens = sum(job.lengths[i] for i in taken)
                job.waiting_tokens -= tokens
                self._queued_tokens -= tokens
                self._queued_inputs -= len(taken)
            if join_below == math.inf:
                # Others join if owed service now (tag below the clock) or due before the
                # anchor's next batch anyway.
                join_below = max(self._vnow, job.tag + len(taken) * longest)
            if len(batch) >= max_items:
                break
        # Charge the padded tokens each job used, and move the clock on by the batch's cost
        # shared among the jobs that were waiting for the device.
        cost = 0
        for job, n_rows in rows.items():
            job.tag += n_rows * longest
            cost += n_rows * longest
        if jobs:
            self._vstart = self._vnow
            self._vnow += cost / len(jobs)
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
            self._failed(e)
            if self._dead:
                return  # every job was settled with 503 as the engine stopped
            jobs = list(dict.fromkeys(job for job, _ in batch))
            if len(jobs) == 1:
                self._fail(jobs[0], e)
                return
            log.warning("a batch of %d requests failed; re-running each alone", len(jobs))
            for job in jobs:
                if self._dead:
                    return
                self._forward([(j, i) for j, i in batch if j is job])
            return
        self._failures = 0
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

    def _failed(self, error: BaseException) -> None:
        """Count a failed pass; past `max_consecutive_failures` in a row the device is taken
        for broken (e.g. a sticky CUDA error, after which every pass fails) and the engine
        stops, so that the platform replaces the replica instead of it answering 500s."""
        self._failures += 1
        if self._failures >= self.limits.max_consecutive_failures:
            self._die(
                f"{self._failures} micro-batches failed in a row (ENGINE_MAX_CONSECUTIVE_FAILURES"
                f"={self.limits.max_consecutive_failures})",
                f"the last with {type(error).__name__}: {error}",
            )

    def _die(self, reason: str, detail: str) -> None:
        """Stop for good: fail the health check, and answer every queued and running job (and
        scoring task) 503 with Retry-After. Clients get `reason`; the log also has `detail`
        (an exception's text may hold internals)."""
        with self._cond:
            if self._dead is None:
                self._dead = reason
            jobs = list(dict.fromkeys(self._jobs + self._running))
            self._jobs = []
            tasks = list(self._tasks)
            self._tasks.clear()
            for job in jobs:
                job.waiting, job.waiting_tokens = [], 0
            self._queued_tokens = self._queued_inputs = 0
            self._publish_queue()
            self._cond.notify_all()
        log.critical(
            "the engine stopped: %s, %s; the health check fails from now on so that the replica "
            "is replaced, and %d requests get 503", reason, detail, len(jobs),
        )  # fmt: skip
        for job in jobs:
            _settle(job.future, error=self._unavailable())
        for _, future in tasks:
            if future.set_running_or_notify_cancel():
                future.set_exception(self._unavailable())

    def _unavailable(self) -> RequestError:
        reason = self._dead or "its worker thread ended"
        return RequestError(
            f"the model's engine has stopped ({reason}); this replica fails its health check "
            f"and is being replaced: retry after {DEAD_RETRY_AFTER_S} s",
            status=503,
            code="engine_unavailable",
            headers={"Retry-After": str(DEAD_RETRY_AFTER_S)},
        )

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
