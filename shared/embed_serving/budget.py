"""A server-wide budget (pixels, bytes) shared by all requests on one event loop.

Image work is admitted only while its cost fits, so the memory it holds is bounded by a
setting whatever clients send. Waiters are served first come, first served: a big reservation
at the head is not starved by a stream of small ones. Every reservation must fit the whole
budget (callers refuse bigger ones up front), and holders never wait on another reservation
while holding one, so waiting cannot deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class Budget:
    """A counting budget for asyncio code; every call must come from the event loop thread.

    Futures are created per waiter on the running loop, so one Budget outlives event loops
    (tests run several) without binding to one.
    """

    def __init__(self, total: int, name: str) -> None:
        if total <= 0:
            raise ValueError(f"{name} must be > 0, got {total}")
        self.total = total
        self.name = name  # the setting, for messages
        self.used = 0
        self.peak = 0  # highest `used` seen (tests and logs)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, amount: int) -> None:
        if amount > self.total:
            raise ValueError(f"{amount} exceeds the whole budget {self.name}={self.total}")
        if not self._waiters and self.used + amount <= self.total:
            self._take(amount)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(amount)  # granted just as we were cancelled: hand it back
            else:
                with contextlib.suppress(ValueError):  # _wake may have dropped it already
                    self._waiters.remove(entry)
                self._wake()  # we may have been the head that blocked smaller waiters
            raise

    def release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        await self.acquire(amount)
        try:
            yield
        finally:
            self.release(amount)

    def _take(self, amount: int) -> None:
        self.used += amount
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters:
            amount, future = self._waiters[0]
            if future.done():  # cancelled, not yet removed by its waiter
                self._waiters.popleft()
                continue
            if self.used + amount > self.total:
                return
            self._waiters.popleft()
            self._take(amount)
            future.set_result(None)
