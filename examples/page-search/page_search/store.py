"""Where the index lives: one small `Store` interface, two embedded back-ends.

Per page a store keeps the file, the page number, the content hash (and the hash of the whole
source file, so that resuming can skip an unchanged file without rendering it), the MUVERA
FDE vector (the ANN stage) and the multi-vector (the exact rerank). A page's key is its file
and page number: re-indexing a changed page replaces it, so every page is there exactly once.

- `LanceStore` (default): LanceDB, embedded (a folder; no server). The FDE is a vector column
  searched by dot product; the multi-vector is float32 bytes plus its token count, read only
  for the candidates.
- `QdrantStore`: qdrant-client in local mode (`QdrantClient(path=...)`, also no server): a
  named dense vector for the FDE and a named multivector (MaxSim comparator, no HNSW graph)
  for the rerank. Local mode holds the collection in memory: fine to tens of thousands of
  pages; beyond that, point the same code at a Qdrant server.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

STORES = ("lancedb", "qdrant")
TABLE = "pages"
# Pages read at once when scoring: a colembed-3b page is ~20 MB of float32 vectors unpooled,
# so this bounds a search's memory to a few hundred MB whatever the index size.
SCAN_BATCH = 16


@dataclass(frozen=True)
class PageKey:
    file: str
    page: int
    sha256: str  # of the page image sent to the server
    source_sha256: str  # of the whole file it came from


@dataclass
class PageRecord:
    key: PageKey
    fde: np.ndarray  # (fde_dim,) float32
    vectors: np.ndarray  # (tokens, dim) float32


class Store(Protocol):
    def catalog(self) -> dict[tuple[str, int], PageKey]:
        """Every indexed page by (file, page), without vectors."""
        ...

    def upsert(self, records: Sequence[PageRecord]) -> None: ...

    def delete_pages_after(self, file: str, last_page: int) -> None:
        """Drop pages of `file` numbered above `last_page` (the file got shorter; 0: it is
        gone)."""
        ...

    def nearest(self, fde: np.ndarray, n: int) -> list[PageKey]:
        """The `n` pages whose FDE has the highest dot product with `fde`, best first."""
        ...

    def fetch(self, keys: Sequence[PageKey]) -> list[PageRecord]:
        """These pages with their vectors (a page is ~20 MB unpooled: ask for a few)."""
        ...

    def scan(self, batch: int = SCAN_BATCH) -> Iterator[list[PageRecord]]:
        """Every page with its vectors, `batch` at a time (for exact search)."""
        ...

    def count(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class IndexMeta:
    """What an index was built with; search encodes queries with the same FDE parameters."""

    store: str
    fde: dict[str, int]
    pool_factor: int
    dpi: float

    @classmethod
    def read(cls, db: Path) -> IndexMeta | None:
        path = Path(db) / "meta.json"
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def write(self, db: Path) -> None:
        Path(db).mkdir(parents=True, exist_ok=True)
        (Path(db) / "meta.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


def open_store(kind: str, db: Path) -> Store:
    if kind == "lancedb":
        return LanceStore(Path(db) / "lancedb")
    if kind == "qdrant":
        return QdrantStore(Path(db) / "qdrant")
    raise ValueError(f"unknown store {kind!r}; one of {', '.join(STORES)}")


def page_id(file: str, page: int) -> str:
    return hashlib.sha256(f"{file}\0{page}".encode()).hexdigest()


def _point_id(file: str, page: int) -> str:
    return str(uuid.UUID(hex=page_id(file, page)[:32]))  # Qdrant ids: integers or UUIDs


_KEY_COLUMNS = ("file", "page", "sha256", "source_sha256")


def _key(row: dict[str, Any]) -> PageKey:
    return PageKey(*(row[c] for c in _KEY_COLUMNS))


class LanceStore:
    def __init__(self, path: Path) -> None:
        # Lance's native logger warns on stderr that a new table "will be created"; errors
        # still show. LANCE_LOG set by the user wins.
        os.environ.setdefault("LANCE_LOG", "error")
        import lancedb

        self._db = lancedb.connect(str(path))
        self._table = self._db.open_table(TABLE) if TABLE in self._tables() else None

    def _tables(self) -> list[str]:
        return list(self._db.list_tables().tables)

    def catalog(self) -> dict[tuple[str, int], PageKey]:
        if self._table is None:
            return {}
        query = self._table.search().select(list(_KEY_COLUMNS)).limit(None)
        return {(r["file"], r["page"]): _key(r) for r in query.to_arrow().to_pylist()}

    def upsert(self, records: Sequence[PageRecord]) -> None:
        import pyarrow as pa

        if not records:
            return
        fde_dim = len(records[0].fde)
        schema = pa.schema(
            [
                ("id", pa.string()),
                ("file", pa.string()),
                ("page", pa.int32()),
                ("sha256", pa.string()),
                ("source_sha256", pa.string()),
                ("fde", pa.list_(pa.float32(), fde_dim)),
                ("tokens", pa.int32()),
                ("dim", pa.int32()),
                ("vectors", pa.large_binary()),
            ]
        )
        rows = pa.Table.from_pylist(
            [
                {
                    "id": page_id(r.key.file, r.key.page),
                    **asdict(r.key),
                    "fde": np.asarray(r.fde, np.float32),
                    "tokens": r.vectors.shape[0],
                    "dim": r.vectors.shape[1],
                    "vectors": np.ascontiguousarray(r.vectors, "<f4").tobytes(),
                }
                for r in records
            ],
            schema=schema,
        )
        if self._table is None:
            self._table = self._db.create_table(TABLE, schema=schema, exist_ok=True)
        # One commit per call: a run killed mid-way keeps every batch written before.
        (
            self._table.merge_insert("id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(rows)
        )

    def delete_pages_after(self, file: str, last_page: int) -> None:
        if self._table is not None:
            quoted = file.replace("'", "''")
            self._table.delete(f"file = '{quoted}' AND page > {int(last_page)}")

    def nearest(self, fde: np.ndarray, n: int) -> list[PageKey]:
        if self._table is None:
            return []
        query = self._table.search(np.asarray(fde, np.float32), vector_column_name="fde")
        query = query.distance_type("dot").select([*_KEY_COLUMNS, "_distance"]).limit(n)
        return [_key(row) for row in query.to_arrow().to_pylist()]

    def fetch(self, keys: Sequence[PageKey]) -> list[PageRecord]:
        if self._table is None or not keys:
            return []
        ids = ", ".join(f"'{page_id(k.file, k.page)}'" for k in keys)  # hex: nothing to quote
        rows = self._table.search().where(f"id IN ({ids})").limit(None).to_arrow().to_pylist()
        return [self._record(row) for row in rows]

    def scan(self, batch: int = SCAN_BATCH) -> Iterator[list[PageRecord]]:
        if self._table is None:
            return
        for chunk in self._table.search().limit(None).to_batches(batch):
            yield [self._record(row) for row in chunk.to_pylist()]

    def count(self) -> int:
        return 0 if self._table is None else self._table.count_rows()

    def close(self) -> None:
        pass

    @staticmethod
    def _record(row: dict[str, Any]) -> PageRecord:
        vectors = np.frombuffer(row["vectors"], "<f4").reshape(row["tokens"], row["dim"])
        return PageRecord(_key(row), np.asarray(row["fde"], np.float32), vectors)


class QdrantStore:
    def __init__(self, path: Path) -> None:
        from qdrant_client import QdrantClient

        Path(path).mkdir(parents=True, exist_ok=True)
        self._client = QdrantClient(path=str(path))
        self._ready = self._client.collection_exists(TABLE)

    def _create(self, fde_dim: int, dim: int) -> None:
        from qdrant_client import models

        self._client.create_collection(
            TABLE,
            vectors_config={
                "fde": models.VectorParams(size=fde_dim, distance=models.Distance.DOT),
                # Only ever read back for the rerank: no graph to build.
                "mv": models.VectorParams(
                    size=dim,
                    distance=models.Distance.DOT,
                    multivector_config=models.MultiVectorConfig(
                        comparator=models.MultiVectorComparator.MAX_SIM
                    ),
                    hnsw_config=models.HnswConfigDiff(m=0),
                ),
            },
        )
        self._ready = True

    def catalog(self) -> dict[tuple[str, int], PageKey]:
        if not self._ready:
            return {}
        out: dict[tuple[str, int], PageKey] = {}
        offset = None
        while True:
            points, offset = self._client.scroll(
                TABLE, limit=1024, offset=offset, with_payload=True, with_vectors=False
            )
            for p in points:
                key = PageKey(**p.payload)
                out[(key.file, key.page)] = key
            if offset is None:
                return out

    def upsert(self, records: Sequence[PageRecord]) -> None:
        from qdrant_client import models

        if not records:
            return
        if not self._ready:
            self._create(len(records[0].fde), records[0].vectors.shape[1])
        points = [
            models.PointStruct(
                id=_point_id(r.key.file, r.key.page),
                vector={"fde": r.fde.tolist(), "mv": r.vectors.tolist()},
                payload=asdict(r.key),
            )
            for r in records
        ]
        self._client.upsert(TABLE, points)

    def delete_pages_after(self, file: str, last_page: int) -> None:
        from qdrant_client import models

        if not self._ready:
            return
        selector = models.FilterSelector(
            filter=models.Filter(
                must=[
                    models.FieldCondition(key="file", match=models.MatchValue(value=file)),
                    models.FieldCondition(key="page", range=models.Range(gt=last_page)),
                ]
            )
        )
        self._client.delete(TABLE, points_selector=selector)

    def nearest(self, fde: np.ndarray, n: int) -> list[PageKey]:
        if not self._ready:
            return []
        result = self._client.query_points(
            TABLE, query=np.asarray(fde, np.float32).tolist(), using="fde", limit=n
        )
        return [PageKey(**p.payload) for p in result.points]

    def fetch(self, keys: Sequence[PageKey]) -> list[PageRecord]:
        if not self._ready or not keys:
            return []
        ids = [_point_id(k.file, k.page) for k in keys]
        points = self._client.retrieve(TABLE, ids, with_payload=True, with_vectors=True)
        return [self._record(p) for p in points]

    def scan(self, batch: int = SCAN_BATCH) -> Iterator[list[PageRecord]]:
        if not self._ready:
            return
        offset = None
        while True:
            points, offset = self._client.scroll(
                TABLE, limit=batch, offset=offset, with_payload=True, with_vectors=True
            )
            yield [self._record(p) for p in points]
            if offset is None:
                return

    def count(self) -> int:
        return self._client.count(TABLE).count if self._ready else 0

    def close(self) -> None:
        self._client.close()

    @staticmethod
    def _record(point: Any) -> PageRecord:
        return PageRecord(
            PageKey(**point.payload),
            np.asarray(point.vector["fde"], np.float32),
            np.asarray(point.vector["mv"], np.float32),
        )
