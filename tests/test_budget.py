"""The server-wide Budget behind IMAGE_DECODE_BUDGET_PIXELS / IMAGE_MEMORY_BUDGET_BYTES, and
process_images holding at most that many decoded pixels at once."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import pytest
from PIL import Image

from embed_serving.budget import Budget
from embed_serving.images import ImageLimits, ImageSource, process_images


def test_first_come_first_served_and_bounded() -> None:
    async def go() -> list[str]:
        budget = Budget(10, "B")
        order: list[str] = []
        await budget.acquire(8)

        async def take(name: str, amount: int) -> None:
            async with budget.hold(amount):
                order.append(name)
                await asyncio.sleep(0.01)

        big = asyncio.create_task(take("big", 10))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 1))  # would fit now, but waits behind big
        await asyncio.sleep(0.01)
        assert order == []
        budget.release(8)
        await asyncio.gather(big, small)
        assert budget.used == 0 and budget.peak == 10
        return order

    assert asyncio.run(go()) == ["big", "small"]


def test_cancelled_waiter_leaves_the_line() -> None:
    async def go() -> None:
        budget = Budget(10, "B")
        await budget.acquire(6)
        blocked = asyncio.create_task(budget.acquire(10))
        await asyncio.sleep(0)
        queued = asyncio.create_task(budget.acquire(4))  # fits, but waits behind `blocked`
        await asyncio.sleep(0)
        blocked.cancel()
        await asyncio.wait_for(queued, 1)
        assert budget.used == 10
        with pytest.raises(ValueError, match="B=10"):
            await budget.acquire(11)

    asyncio.run(go())


def test_process_images_holds_at_most_the_pixel_budget() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), (1, 2, 3)).save(buf, "PNG")
    content = base64.b64encode(buf.getvalue()).decode()
    limits = ImageLimits(max_pixels=10_000, decode_budget_pixels=20_000, max_concurrency=8)
    live = 0
    worst = 0
    lock = threading.Lock()

    def convert(image: Image.Image) -> tuple[int, int]:
        nonlocal live, worst
        with lock:
            live += 1
            worst = max(worst, live)
        threading.Event().wait(0.02)
        with lock:
            live -= 1
        return image.size

    async def go() -> list[tuple[int, int]]:
        budget = Budget(limits.decode_budget_pixels, "IMAGE_DECODE_BUDGET_PIXELS")
        sources = [ImageSource(content=content)] * 12
        out = await process_images(sources, limits, convert, pixels=budget)
        assert budget.used == 0
        return out

    assert asyncio.run(go()) == [(100, 100)] * 12
    assert worst <= 2  # two 10k-pixel images fit the 20k budget, never three


def test_decode_budget_must_admit_one_image() -> None:
    with pytest.raises(ValueError, match="IMAGE_DECODE_BUDGET_PIXELS"):
        ImageLimits(max_pixels=100, decode_budget_pixels=99)
