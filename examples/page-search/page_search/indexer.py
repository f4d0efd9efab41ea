"""Indexing a folder: render pages, embed them concurrently, write them to the store.

The pipeline, all bounded:
- one render thread (pdfium is not thread-safe) turns files into pages, skipping what the
  store already holds: a file whose every page was indexed from the same file bytes is not
  even rendered; otherwise each page whose content hash matches is skipped;
- pages are grouped into requests of `batch_pages`; at most `concurrency` requests are in
  flight, and the queue in front of them holds at most `concurrency` more, so memory does not
  grow with the folder;
- each answered request is written to the store at once (one commit), so a run killed at any
  point loses only the requests in flight: re-running embeds exactly the pages missing;
- a file that cannot be read, or a page the server refuses, is reported and skipped.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .client import ColembedClient, Embedding, Rejected
from .pages import (
    Page,
    PageError,
    Source,
    Unreadable,
    file_sha256,
    find_sources,
    page_count,
    render_pages,
)
from .store import PageKey, PageRecord, Store


@dataclass
class Report:
    pages: int = 0  # pages found in readable files
    embedded: int = 0
    skipped: int = 0  # already indexed with the same content
    pruned: int = 0  # pages of files no longer in the folder, removed (prune=True)
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"file", "page"?, "error"}
    retries: int = 0
    seconds: float = 0.0


@dataclass
class _Batch:
    pages: list[Page]
    source_sha: dict[str, str]


async def index_folder(
    root: Path,
    store: Store,
    client: ColembedClient,
    *,
    dpi: float,
    batch_pages: int = 4,
    concurrency: int = 4,
    progress: bool = True,
    prune: bool = False,
    on_page: Callable[[Page], None] | None = None,
) -> Report:
    report, start = Report(), time.monotonic()
    loop = asyncio.get_running_loop()
    render = ThreadPoolExecutor(1, thread_name_prefix="render")
    write = ThreadPoolExecutor(1, thread_name_prefix="store")  # the stores are not concurrent

    def fail(file: str, error: str, page: int | None = None) -> None:
        where = file if page is None else f"{file} page {page}"
        tqdm.write(f"skipped {where}: {error}", file=sys.stderr)
        report.failed.append({"file": file, **({"page": page} if page else {}), "error": error})

    client.on_retry = lambda why: tqdm.write(f"server busy ({why})", file=sys.stderr)
    catalog = await loop.run_in_executor(write, store.catalog)
    sources = find_sources(root)
    if prune:
        present = {source.rel for source in sources}
        for file in sorted({f for f, _ in catalog} - present):
            await loop.run_in_executor(write, store.delete_pages_after, file, 0)
            report.pruned += sum(1 for f, _ in catalog if f == file)
    # First pass, cheap: hashes and page counts, so the bar knows its total.
    plan: list[tuple[Source, str, int]] = []
    for source in sources:
        try:
            sha = await loop.run_in_executor(render, file_sha256, source.path)
            n = await loop.run_in_executor(render, page_count, source)
        except (Unreadable, OSError) as e:
            fail(source.rel, str(e))
            continue
        report.pages += n
        done = [catalog.get((source.rel, p)) for p in range(1, n + 1)]
        if all(k is not None and k.source_sha256 == sha for k in done):
            report.skipped += n
            continue
        plan.append((source, sha, n))

    bar = tqdm(
        total=sum(n for _, _, n in plan),
        unit="page",
        disable=not progress,
        file=sys.stderr,
        smoothing=0.1,
        dynamic_ncols=True,
    )
    queue: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=concurrency)

    async def produce() -> None:
        batch = _Batch([], {})
        for source, sha, n in plan:
            await loop.run_in_executor(write, store.delete_pages_after, source.rel, n)
            pages = render_pages(source, list(range(1, n + 1)), dpi)
            seen = 0
            while True:
                try:
                    page = await loop.run_in_executor(render, next, pages, None)
                except (Unreadable, OSError) as e:
                    fail(source.rel, str(e))
                    report.pages -= n - seen  # counts the pages of readable files
                    bar.update(n - seen)
                    break
                if page is None:
                    break
                seen += 1
                if isinstance(page, PageError):
                    fail(page.file, page.error, page.page)
                    bar.update(1)
                    continue
                known = catalog.get((page.file, page.page))
                if known is not None and known.sha256 == page.sha256:
                    report.skipped += 1
                    bar.update(1)
                    continue
                batch.pages.append(page)
                batch.source_sha[page.file] = sha
                if len(batch.pages) == batch_pages:
                    await queue.put(batch)
                    batch = _Batch([], {})
        if batch.pages:
            await queue.put(batch)
        for _ in range(concurrency):
            await queue.put(None)

    async def embed(batch: _Batch) -> list[tuple[Page, Embedding]]:
        """(page, embedding) per page; a refused batch is retried page by page so that one
        bad page does not cost its neighbours."""
        try:
            out = await client.embed_pages([p.image for p in batch.pages])
            return list(zip(batch.pages, out, strict=True))
        except Rejected as e:
            if not e.about_the_request:
                raise
            if len(batch.pages) == 1:
                fail(batch.pages[0].file, str(e), batch.pages[0].page)
                return []
        results: list[tuple[Page, Embedding]] = []
        for page in batch.pages:
            results += await embed(_Batch([page], batch.source_sha))
        return results

    async def consume() -> None:
        while (batch := await queue.get()) is not None:
            done = await embed(batch)
            records = [
                PageRecord(
                    PageKey(p.file, p.page, p.sha256, batch.source_sha[p.file]), e.fde, e.vectors
                )
                for p, e in done
            ]
            await loop.run_in_executor(write, store.upsert, records)
            report.embedded += len(records)
            for page, _ in done:
                if on_page:
                    on_page(page)
            bar.update(len(batch.pages))

    try:
        async with asyncio.TaskGroup() as tasks:  # one failing task cancels the others
            tasks.create_task(produce())
            for _ in range(concurrency):
                tasks.create_task(consume())
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None  # the cause, not the group around it
    finally:
        bar.close()
        render.shutdown(wait=True, cancel_futures=True)
        write.shutdown(wait=True)
    report.retries = client.retries
    report.seconds = time.monotonic() - start
    return report
