"""Long-term agent memory on one node: records in SQLite, searched per namespace with a torch matrix.

Records keep their embeddings as float32 blobs; each namespace's search index (unit rows in a matrix)
is loaded into RAM on first use. Records carry stable ids so that replicas exchange them idempotently
(``put_record``, ``records_since``, ``entries``). On a node the namespaces are storage ids
(agent.memory_placement), never the names their owners gave them. Writes are durable once they return
(SQLite ``synchronous=FULL``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from edgeswarm.agent.embeddings import TextEmbedder

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
RECORD_ID_RE = NAMESPACE_RE
MAX_TEXT_BYTES = 32 * 1024
MAX_METADATA_BYTES = 16 * 1024


class StoreClosedError(RuntimeError):
    """The vector store was closed."""


# --------------------------------------------------------------------------- validation


def check_namespace(namespace: str) -> str:
    """Return the namespace if valid (``^[A-Za-z0-9_.:-]{1,128}$``), else raise ValueError."""
    if not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace):
        raise ValueError(f"invalid namespace {namespace!r}: use 1-128 characters from A-Z a-z 0-9 _ . : -")
    return namespace


def check_record_id(record_id: str) -> str:
    """Return the record id if valid (same alphabet as namespaces), else raise ValueError."""
    if not isinstance(record_id, str) or not RECORD_ID_RE.match(record_id):
        raise ValueError(f"invalid record id {record_id!r}: use 1-128 characters from A-Z a-z 0-9 _ . : -")
    return record_id


def _check_text(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"memory text must be str, got {type(text).__name__}")
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise ValueError(f"memory text is {size} bytes, more than the {MAX_TEXT_BYTES} allowed")
    return text


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def _metadata_json(metadata: dict | None) -> str:
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        encoded = json.dumps(metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata is not JSON-serialisable: {exc}") from exc
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {len(encoded)} bytes as JSON, more than the {MAX_METADATA_BYTES} allowed")
    return encoded


# --------------------------------------------------------------------------- records


def _to_blob(embedding: torch.Tensor) -> bytes:
    return embedding.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()


def _from_blob(blob: bytes, dim: int) -> torch.Tensor:
    if len(blob) != dim * 4:
        raise ValueError(f"stored embedding has {len(blob)} bytes, expected {dim * 4} (dim {dim})")
    return torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy())


@dataclass
class MemoryRecord:
    """One long-term memory: text, metadata and its embedding, identified by (namespace, id)."""

    id: str
    namespace: str
    text: str
    metadata: dict = field(default_factory=dict)
    created: float = 0.0
    embedding: torch.Tensor | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable copy; the embedding is base64 float32 so it round-trips exactly."""
        blob = None if self.embedding is None else base64.b64encode(_to_blob(self.embedding)).decode("ascii")
        return {"id": self.id, "namespace": self.namespace, "text": self.text, "metadata": self.metadata,
                "created": self.created, "embedding": blob}

    @classmethod
    def from_dict(cls, data: dict) -> MemoryRecord:
        """Inverse of ``to_dict``."""
        blob = data.get("embedding")
        embedding = None
        if blob is not None:
            raw = base64.b64decode(blob)
            embedding = _from_blob(raw, len(raw) // 4)
        return cls(id=data["id"], namespace=data["namespace"], text=data["text"], metadata=dict(data.get("metadata") or {}),
                   created=float(data["created"]), embedding=embedding)


class _NamespaceIndex:
    """RAM search index of one namespace: unit embedding rows in a growable matrix, and their ids."""

    def __init__(self, dim: int):
        self.matrix = torch.empty(0, dim, dtype=torch.float32)
        self.ids: list[str] = []
        self.row_of: dict[str, int] = {}

    @classmethod
    def from_rows(cls, ids: list[str], blobs: list[bytes], dim: int) -> _NamespaceIndex:
        """Build an index from stored ids and float32 embedding blobs in one pass."""
        index = cls(dim)
        for blob in blobs:
            if len(blob) != dim * 4:
                raise ValueError(f"stored embedding has {len(blob)} bytes, expected {dim * 4} (dim {dim})")
        if ids:
            raw = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), dim)
            index.matrix = torch.nn.functional.normalize(torch.from_numpy(raw.copy()), dim=1)
            index.ids = list(ids)
            index.row_of = {rid: row for row, rid in enumerate(ids)}
        return index

    def upsert(self, record_id: str, embedding: torch.Tensor) -> None:
        vector = torch.nn.functional.normalize(embedding.to(torch.float32), dim=0)
        row = self.row_of.get(record_id)
        if row is None:
            row = len(self.ids)
            self._reserve(row + 1)
            self.ids.append(record_id)
            self.row_of[record_id] = row
        self.matrix[row] = vector

    def remove(self, record_id: str) -> None:
        """Remove a row by moving the last row into its place."""
        row = self.row_of.pop(record_id, None)
        if row is None:
            return
        last = len(self.ids) - 1
        if row != last:
            moved = self.ids[last]
            self.matrix[row] = self.matrix[last]
            self.ids[row] = moved
            self.row_of[moved] = row
        self.ids.pop()

    def top(self, query: torch.Tensor, k: int) -> list[tuple[str, float]]:
        n = len(self.ids)
        if n == 0:
            return []
        scores = self.matrix[:n] @ query
        values, rows = torch.topk(scores, min(k, n))
        return [(self.ids[row], float(value)) for value, row in zip(values.tolist(), rows.tolist(), strict=True)]

    def _reserve(self, rows: int) -> None:
        if rows > self.matrix.shape[0]:
            grown = torch.empty(max(rows, 2 * self.matrix.shape[0], 16), self.matrix.shape[1], dtype=torch.float32)
            grown[: len(self.ids)] = self.matrix[: len(self.ids)]
            self.matrix = grown


# --------------------------------------------------------------------------- vector store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    id TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created REAL NOT NULL,
    embedding BLOB NOT NULL,
    UNIQUE (namespace, id)
);
CREATE INDEX IF NOT EXISTS records_by_namespace ON records (namespace, rowid);
"""

_COLUMNS = "rowid, namespace, id, text, metadata, created, embedding"


class VectorStore:
    """Long-term memory: records in SQLite, cosine search per namespace on an in-RAM torch matrix.

    ``path`` is a SQLite file, or ``None``/``":memory:"`` for a throw-away store. All methods are
    thread-safe. Writing a record id that exists replaces it only if its text or metadata changed
    (it then gets a new rowid so replicas see the change through ``records_since``).
    """

    def __init__(self, path: str | None, embedder: TextEmbedder):
        self.path = path or ":memory:"
        self.embedder = embedder
        self.dim = int(embedder.dim)
        self._lock = threading.RLock()
        self._indexes: dict[str, _NamespaceIndex] = {}
        self._conn: sqlite3.Connection | None = sqlite3.connect(self.path, check_same_thread=False)
        self._init_db()

    # ---- lifecycle

    def _init_db(self) -> None:
        conn = self._db()
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a write that returned survives a power cut
        with conn:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('dim', ?)", (str(self.dim),))
        stored = int(conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()[0])
        if stored != self.dim:
            raise ValueError(f"{self.path} holds {stored}-wide embeddings but the embedder makes {self.dim}-wide ones")

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosedError(f"vector store {self.path} is closed")
        return self._conn

    def close(self) -> None:
        """Close the database; later calls raise StoreClosedError."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._indexes.clear()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes

    def write(self, namespace: str, text: str, metadata: dict | None = None, record_id: str | None = None) -> MemoryRecord:
        """Embed and store a text; with an existing ``record_id`` and the same content this is a no-op."""
        return self.write_many(namespace, [text], [metadata], [record_id])[0]

    def write_many(self, namespace: str, texts: list[str], metadatas: list[dict | None] | None = None,
                   record_ids: list[str | None] | None = None) -> list[MemoryRecord]:
        """Like ``write`` for several texts, embedded in one batch."""
        check_namespace(namespace)
        metadatas = metadatas if metadatas is not None else [None] * len(texts)
        record_ids = record_ids if record_ids is not None else [None] * len(texts)
        if not len(texts) == len(metadatas) == len(record_ids):
            raise ValueError("texts, metadatas and record_ids must have the same length")
        rows = [(check_record_id(rid) if rid is not None else uuid.uuid4().hex, _check_text(text), _metadata_json(meta))
                for text, meta, rid in zip(texts, metadatas, record_ids, strict=True)]
        with self._lock:
            results = {rid: self._get(namespace, rid) for rid, _, _ in rows}
        todo = [row for row in rows if not _same_content(results[row[0]], row[1], row[2])]
        if todo:
            # Embed outside the lock so searches are not held up; re-check for a racing write after.
            embeddings = self.embedder.embed([text for _, text, _ in todo])
            with self._lock, self._db():
                now = time.time()
                for (rid, text, meta), embedding in zip(todo, embeddings, strict=True):
                    current = self._get(namespace, rid)
                    if _same_content(current, text, meta):
                        results[rid] = current
                    else:
                        results[rid] = MemoryRecord(rid, namespace, text, json.loads(meta), now, embedding.clone())
                        self._store(results[rid])
        return [results[rid] for rid, _, _ in rows]

    def put_record(self, record: MemoryRecord) -> bool:
        """Store a record received from a replica, embedding included, without re-embedding.

        The newer ``created`` wins; an equal or older copy is ignored. Returns whether it was stored.
        """
        check_namespace(record.namespace)
        check_record_id(record.id)
        _check_text(record.text)
        meta = _metadata_json(record.metadata)
        if record.embedding is None or tuple(record.embedding.shape) != (self.dim,):
            shape = None if record.embedding is None else tuple(record.embedding.shape)
            raise ValueError(f"record {record.id} needs a ({self.dim},) embedding, got {shape}")
        if not math.isfinite(record.created):
            raise ValueError(f"record {record.id} has a non-finite created time")
        with self._lock:
            current = self._get(record.namespace, record.id)
            if current is not None and current.created >= record.created:
                return False
            stored = MemoryRecord(record.id, record.namespace, record.text, json.loads(meta), float(record.created),
                                  record.embedding.detach().to(torch.float32).cpu().clone())
            with self._db():
                self._store(stored)
            return True

    def _store(self, record: MemoryRecord) -> None:
        """Replace (namespace, id) with a new row; caller holds the lock and the transaction."""
        conn = self._db()
        conn.execute("DELETE FROM records WHERE namespace = ? AND id = ?", (record.namespace, record.id))
        conn.execute("INSERT INTO records (namespace, id, text, metadata, created, embedding) VALUES (?, ?, ?, ?, ?, ?)",
                     (record.namespace, record.id, record.text, _metadata_json(record.metadata), record.created,
                      _to_blob(record.embedding)))
        index = self._indexes.get(record.namespace)
        if index is not None:
            index.upsert(record.id, record.embedding)

    def delete(self, namespace: str, record_id: str) -> bool:
        """Delete a record; returns whether it existed."""
        check_namespace(namespace)
        with self._lock:
            with self._db() as conn:
                gone = conn.execute("DELETE FROM records WHERE namespace = ? AND id = ?", (namespace, record_id)).rowcount
            index = self._indexes.get(namespace)
            if index is not None:
                index.remove(record_id)
            return gone > 0

    # ---- reads

    def get(self, namespace: str, record_id: str) -> MemoryRecord | None:
        """The record with this id, or None."""
        check_namespace(namespace)
        with self._lock:
            return self._get(namespace, record_id)

    def _get(self, namespace: str, record_id: str) -> MemoryRecord | None:
        row = self._db().execute(f"SELECT {_COLUMNS} FROM records WHERE namespace = ? AND id = ?",
                                 (namespace, record_id)).fetchone()
        return None if row is None else self._record(row)

    def _record(self, row: tuple) -> MemoryRecord:
        _, namespace, record_id, text, metadata, created, blob = row
        return MemoryRecord(record_id, namespace, text, json.loads(metadata), created, _from_blob(blob, self.dim))

    def search(self, namespace: str, query: str, k: int = 5, min_score: float | None = None) -> list[tuple[MemoryRecord, float]]:
        """The ``k`` records most similar to ``query`` (cosine), best first, optionally above ``min_score``."""
        check_namespace(namespace)
        _check_text(query)
        _check_k(k)
        query_vector = self.embedder.embed([query])[0]
        return self.search_vector(namespace, query_vector, k, min_score)

    def search_vector(self, namespace: str, vector: torch.Tensor, k: int = 5,
                      min_score: float | None = None) -> list[tuple[MemoryRecord, float]]:
        """Like ``search`` with an already computed query embedding of width ``dim``."""
        check_namespace(namespace)
        _check_k(k)
        if tuple(vector.shape) != (self.dim,):
            raise ValueError(f"query embedding must have shape ({self.dim},), got {tuple(vector.shape)}")
        query = torch.nn.functional.normalize(vector.detach().to(torch.float32).cpu(), dim=0)
        with self._lock:
            hits = self._index(namespace).top(query, k)
            if min_score is not None:
                hits = [(rid, score) for rid, score in hits if score >= min_score]
            return [(self._get(namespace, rid), score) for rid, score in hits]

    def _index(self, namespace: str) -> _NamespaceIndex:
        """The namespace's RAM index, loaded from SQLite on first use."""
        index = self._indexes.get(namespace)
        if index is None:
            rows = self._db().execute("SELECT id, embedding FROM records WHERE namespace = ? ORDER BY rowid",
                                      (namespace,)).fetchall()
            index = _NamespaceIndex.from_rows([rid for rid, _ in rows], [blob for _, blob in rows], self.dim)
            self._indexes[namespace] = index
        return index

    def namespaces(self) -> list[str]:
        """The namespaces that hold at least one record, sorted."""
        with self._lock:
            return [row[0] for row in self._db().execute("SELECT DISTINCT namespace FROM records ORDER BY namespace")]

    def count(self, namespace: str) -> int:
        """How many records a namespace holds."""
        check_namespace(namespace)
        with self._lock:
            return self._db().execute("SELECT COUNT(*) FROM records WHERE namespace = ?", (namespace,)).fetchone()[0]

    def entries(self, namespace: str) -> dict[str, float]:
        """Every record id of a namespace with its ``created`` time: what a replica compares to find
        the records another lacks."""
        check_namespace(namespace)
        with self._lock:
            return dict(self._db().execute("SELECT id, created FROM records WHERE namespace = ?", (namespace,)))

    def digest(self, namespace: str) -> bytes:
        """A hash of ``entries``: two replicas with the same digest hold the same records."""
        return entries_digest(self.entries(namespace))

    def records(self, namespace: str, record_ids: list[str]) -> list[MemoryRecord]:
        """The records of these ids that exist, embeddings included (for copying them to a replica)."""
        check_namespace(namespace)
        with self._lock:
            return [record for record in (self._get(namespace, rid) for rid in record_ids) if record is not None]

    def records_since(self, namespace: str, after_rowid: int = 0, limit: int | None = None) -> list[tuple[int, MemoryRecord]]:
        """(rowid, record) pairs written to a namespace after ``after_rowid``, oldest first, for replica catch-up.

        A replica remembers the last rowid it applied and asks again from there. Deletions are not
        reported: a deleted record simply stops appearing.
        """
        check_namespace(namespace)
        with self._lock:
            sql = f"SELECT {_COLUMNS} FROM records WHERE namespace = ? AND rowid > ? ORDER BY rowid"
            params: tuple = (namespace, int(after_rowid))
            if limit is not None:
                sql, params = sql + " LIMIT ?", params + (int(limit),)
            return [(row[0], self._record(row)) for row in self._db().execute(sql, params)]


def _same_content(record: MemoryRecord | None, text: str, metadata_json: str) -> bool:
    return record is not None and record.text == text and _metadata_json(record.metadata) == metadata_json


def entries_digest(entries: dict[str, float]) -> bytes:
    """The digest of (record id, created) pairs, independent of their order."""
    digest = hashlib.sha256()
    for record_id in sorted(entries):
        digest.update(f"{record_id}\x00{entries[record_id]!r}\n".encode())
    return digest.digest()
