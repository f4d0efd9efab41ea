"""page-search: index PDFs and page images with a colembed-3b deployment, then search them.

  python -m page_search index DOCS_DIR --model-id $ID       # or --url http://127.0.0.1:8080/...
  python -m page_search search "revenue by region" --model-id $ID

The API key is read from BASETEN_API_KEY (not needed for a local server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import httpx

from .client import ColembedClient, FdeParams, Incompatible, Rejected, predict_url
from .indexer import index_folder
from .search import exact_search, search
from .store import STORES, IndexMeta, open_store


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(args.run(args))
    except (Incompatible, Rejected, httpx.HTTPError, ValueError) as e:
        print(f"page-search: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("page-search: interrupted; what was stored stays, re-run to resume", file=sys.stderr)
        return 130


async def run_index(args: argparse.Namespace) -> int:
    if not args.folder.exists():
        raise ValueError(f"no such folder or file: {args.folder}")
    fde = FdeParams(args.fde_k_sim, args.fde_dim_proj, args.fde_r_reps, args.fde_seed)
    wanted = IndexMeta(args.store, asdict(fde), args.pool_factor, args.dpi)
    existing = IndexMeta.read(args.db)
    if existing is not None and existing != wanted:
        old, new = asdict(existing), asdict(wanted)
        diff = ", ".join(f"{k}={old[k]} (this run: {new[k]})" for k in old if old[k] != new[k])
        raise ValueError(
            f"{args.db} was built with {diff}; use the same settings to add to it, or another --db"
        )
    client = ColembedClient(
        _url(args), os.environ.get("BASETEN_API_KEY"), fde, pool_factor=args.pool_factor
    )
    try:
        await client.preflight()
    except BaseException:
        await client.close()
        raise
    # Recorded before the first page is stored, so that no page is ever stored without it.
    wanted.write(args.db)
    store = open_store(args.store, args.db)

    def log_page(page: object) -> None:
        print(json.dumps({"indexed": page.file, "page": page.page}), flush=True)

    try:
        report = await index_folder(
            args.folder,
            store,
            client,
            dpi=args.dpi,
            batch_pages=args.batch_pages,
            concurrency=args.concurrency,
            progress=not args.no_progress,
            prune=args.prune,
            on_page=log_page if args.log_pages else None,
        )
        total = store.count()
    finally:
        await client.close()
        store.close()
    if args.json:
        print(json.dumps({**asdict(report), "indexed_total": total}))
    else:
        rate = report.embedded / report.seconds if report.seconds else 0.0
        print(
            f"{report.embedded} pages embedded, {report.skipped} already indexed, "
            f"{len(report.failed)} skipped as unreadable or refused, {report.retries} retries, "
            f"{report.pruned} pruned; "
            f"{rate:.1f} pages/s. The index holds {total} page(s)."
        )
    return 0


async def run_search(args: argparse.Namespace) -> int:
    meta = IndexMeta.read(args.db)
    if meta is None:
        raise ValueError(f"no index at {args.db}: run `python -m page_search index` first")
    store = open_store(meta.store, args.db)
    client = ColembedClient(_url(args), os.environ.get("BASETEN_API_KEY"), FdeParams(**meta.fde))
    try:
        query = await client.embed_query(args.query)
        if args.exact:
            hits = exact_search(store, query, args.k)
        else:
            hits = search(store, query, args.k, args.candidates)
    finally:
        await client.close()
        store.close()
    if args.json:
        print(json.dumps([asdict(h) for h in hits]))
    else:
        for rank, hit in enumerate(hits, 1):
            print(f"{rank:3d}  {hit.score:9.4f}  {hit.file}  page {hit.page}")
    return 0


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url
    if args.model_id:
        return predict_url(args.model_id, args.environment)
    raise ValueError("give --model-id ID (a Baseten deployment) or --url (e.g. a local server)")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="page_search", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", type=Path, default=Path("page-index"), help="index folder")
    common.add_argument("--model-id", help="Baseten model id of a colembed-3b deployment")
    common.add_argument("--environment", default="production", help="Baseten environment")
    common.add_argument(
        "--url",
        default=os.environ.get("PAGE_SEARCH_URL"),
        help="predict URL instead of --model-id, e.g. http://127.0.0.1:8080/v1/models/model:predict",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    index = sub.add_parser("index", parents=[common], help="index a folder of PDFs and images")
    index.set_defaults(run=run_index)
    index.add_argument("folder", type=Path)
    index.add_argument("--store", choices=STORES, default="lancedb")
    index.add_argument("--dpi", type=float, default=144.0, help="PDF render resolution")
    index.add_argument("--batch-pages", type=_positive, default=4, help="pages per request")
    index.add_argument("--concurrency", type=_positive, default=4, help="requests in flight")
    index.add_argument(
        "--pool-factor", type=_positive, default=1, help="server-side token pooling (1 = off)"
    )
    defaults = FdeParams()
    index.add_argument("--fde-k-sim", type=int, default=defaults.k_sim)
    index.add_argument("--fde-dim-proj", type=int, default=defaults.dim_proj)
    index.add_argument("--fde-r-reps", type=int, default=defaults.r_reps)
    index.add_argument("--fde-seed", type=int, default=defaults.seed)
    index.add_argument(
        "--prune", action="store_true", help="remove pages of files no longer in the folder"
    )
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    index.add_argument(
        "--log-pages", action="store_true", help="print one JSON line per page stored"
    )

    find = sub.add_parser("search", parents=[common], help="search the index")
    find.set_defaults(run=run_search)
    find.add_argument("query")
    find.add_argument("-k", type=_positive, default=5, help="results")
    find.add_argument(
        "--candidates", type=_positive, default=100, help="FDE candidates reranked with MaxSim"
    )
    find.add_argument("--exact", action="store_true", help="MaxSim over every page instead")
    return parser


if __name__ == "__main__":
    sys.exit(main())
