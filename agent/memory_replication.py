"""Keeping every memory namespace on `MEMORY_REPLICAS` live nodes while nodes come and go.

Each memory node, every `REPLICATION_PERIOD` and whenever the set of memory nodes changes, looks at each
namespace (storage id) it holds: it walks the namespace's rendezvous order over the announced memory
nodes, skipping nodes it cannot reach, until `MEMORY_REPLICAS` nodes (itself included, where it comes in
that order) are counted; each of those other nodes is sent the records it lacks. So when a replica dies,
or a new node takes a namespace's first place, the surviving holder copies the namespace to the nodes
that should now hold it within one period (plus a connect timeout for a dead node).

Comparing is cheap when nothing changed: one CompareMemory call per peer carries a digest per namespace
and the peer lists its records (ids and `created` times) only where its digest differs. Then only
missing or older records are sent (PutMemoryRecords). Only announced memory nodes may call either.
A node keeps namespaces it no longer has to hold: they cost disk, not correctness.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import grpc

from edgeswarm.agent.capabilities import TaskCapabilities
from edgeswarm.agent.memory_placement import (
    MEMORY_REPLICAS,
    is_storage_id,
    replica_nodes,
)
from edgeswarm.agent.vector_store import MemoryRecord, VectorStore
from edgeswarm.proto import tasks_pb2 as pb
from edgeswarm.proto import tasks_pb2_grpc as pb_grpc
from edgeswarm.protocol.constants import CONNECT_TIMEOUT
from edgeswarm.protocol.principals import Principal

logger = logging.getLogger(__name__)

REPLICATION_PERIOD = 10.0  # seconds between full placement checks (a membership change triggers one sooner)
MEMBERSHIP_POLL = 2.0  # seconds between looks at which memory nodes are announced
CALL_TIMEOUT = 60.0
MAX_STORES_PER_COMPARE = 1024  # namespaces compared in one call (more go in further calls)
PUT_BATCH_BYTES = 4 << 20  # records sent in one PutMemoryRecords call, by their JSON size
MAX_RECORDS_PER_PUT = 4096
READ_CHUNK = 256  # records read from the store at once while pushing

ChannelFactory = Callable[[str, str], grpc.Channel]  # (address, node id) -> a channel whose calls are signed


class MemoryReplicator:
    """A memory node's side of replication: the background round that pushes its namespaces to the
    nodes that should hold them, and the handlers of its peers' CompareMemory / PutMemoryRecords."""

    def __init__(
        self,
        node_id: str,
        store: VectorStore,
        directory: Callable[[], list[TaskCapabilities]],
        channel: ChannelFactory,
        period: float = REPLICATION_PERIOD,
    ):
        self.node_id = node_id
        self.store = store
        self.directory = directory
        self.channel = channel
        self.period = period
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # --- serving peers ---------------------------------------------------------------------------

    def is_peer(self, caller: Principal | None) -> bool:
        """Whether `caller` is another announced memory node (the only callers replication serves)."""
        if caller is None or caller.is_api_client or caller.id == self.node_id:
            return False
        return any(node.node_id == caller.id and node.memory for node in self.directory())

    def compare(self, digests: dict[str, bytes]) -> dict[str, dict[str, float]]:
        """This node's (record id -> created) of each namespace whose digest here differs from the caller's."""
        if len(digests) > MAX_STORES_PER_COMPARE:
            raise ValueError(f"at most {MAX_STORES_PER_COMPARE} namespaces per comparison, got {len(digests)}")
        differing = {}
        for store, digest in digests.items():
            if not is_storage_id(store):
                raise ValueError(f"{store[:64]!r} is not a storage id")
            if self.store.digest(store) != digest:
                differing[store] = self.store.entries(store)
        return differing

    def accept(self, store: str, records_json: list[str]) -> int:
        """Stores a peer's copies of records (the newer `created` wins); returns how many were new here."""
        if not is_storage_id(store):
            raise ValueError(f"{store[:64]!r} is not a storage id")
        if len(records_json) > MAX_RECORDS_PER_PUT:
            raise ValueError(f"at most {MAX_RECORDS_PER_PUT} records per call, got {len(records_json)}")
        records = []
        for text in records_json:
            try:
                value = json.loads(text)
                records.append(MemoryRecord.from_dict({**value, "namespace": store}))
            except (ValueError, TypeError, KeyError, AttributeError) as error:
                raise ValueError(f"unusable memory record: {error!r}") from error
        return sum(self.store.put_record(record) for record in records)

    # --- pushing to peers ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memory-replication", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        members: frozenset[str] = frozenset()
        last_round = -float("inf")
        while not self._stopped.wait(MEMBERSHIP_POLL):
            try:
                now_members = frozenset(node.node_id for node in self.directory() if node.memory)
                if now_members != members or time.monotonic() - last_round >= self.period:
                    members, last_round = now_members, time.monotonic()
                    self.replicate_once()
            except Exception:  # a failed round must not end replication: the next one retries
                logger.exception("memory replication round failed")

    def replicate_once(self) -> dict[str, list[str]]:
        """One round (see the module docstring); returns node id -> the namespaces compared with it."""
        nodes = {node.node_id: node for node in self.directory() if node.memory and node.node_id != self.node_id}
        stores = [store for store in self.store.namespaces() if is_storage_id(store)]
        reachable: dict[str, bool] = {}
        plan: dict[str, list[str]] = {}
        for store in stores:
            counted = 0
            for node_id in replica_nodes(store, [self.node_id, *nodes], len(nodes) + 1):
                if counted == MEMORY_REPLICAS:
                    break
                if node_id == self.node_id:
                    counted += 1
                elif self._reachable(nodes[node_id], reachable):
                    plan.setdefault(node_id, []).append(store)
                    counted += 1
        for node_id, node_stores in plan.items():
            try:
                self._sync(nodes[node_id], node_stores)
            except grpc.RpcError as error:
                logger.info("could not replicate memory to %s: %s %s", node_id, error.code().name, error.details())
        return plan

    def _reachable(self, node: TaskCapabilities, known: dict[str, bool]) -> bool:
        """Whether `node` connects within CONNECT_TIMEOUT; one that does not is skipped for the round."""
        if node.node_id not in known:
            try:
                grpc.channel_ready_future(self.channel(node.address, node.node_id)).result(timeout=CONNECT_TIMEOUT)
                known[node.node_id] = True
            except grpc.FutureTimeoutError:
                known[node.node_id] = False
        return known[node.node_id]

    def _sync(self, node: TaskCapabilities, stores: list[str]) -> None:
        """Sends `node` the records of `stores` it lacks or holds older copies of."""
        stub = pb_grpc.TaskServiceStub(self.channel(node.address, node.node_id))
        for begin in range(0, len(stores), MAX_STORES_PER_COMPARE):
            chunk = stores[begin : begin + MAX_STORES_PER_COMPARE]
            request = pb.MemoryDigests(stores=[pb.MemoryDigest(store=store, digest=self.store.digest(store)) for store in chunk])
            for theirs in stub.CompareMemory(request, timeout=CALL_TIMEOUT).stores:
                if theirs.store not in chunk:
                    continue
                held = dict(zip(theirs.record_ids, theirs.created, strict=False))
                mine = self.store.entries(theirs.store)
                lacking = [record_id for record_id, created in mine.items() if held.get(record_id, -float("inf")) < created]
                self._push(stub, theirs.store, lacking)
                if lacking:
                    logger.info("copied %d records of namespace %s to %s", len(lacking), theirs.store, node.node_id)

    def _push(self, stub: pb_grpc.TaskServiceStub, store: str, record_ids: list[str]) -> None:
        """Sends records in calls of at most PUT_BATCH_BYTES, reading them READ_CHUNK at a time."""
        batch: list[str] = []
        size = 0
        for begin in range(0, len(record_ids), READ_CHUNK):
            for record in self.store.records(store, record_ids[begin : begin + READ_CHUNK]):
                text = json.dumps(record.to_dict())
                if batch and (size + len(text) > PUT_BATCH_BYTES or len(batch) == MAX_RECORDS_PER_PUT):
                    stub.PutMemoryRecords(pb.MemoryRecords(store=store, records_json=batch), timeout=CALL_TIMEOUT)
                    batch, size = [], 0
                batch.append(text)
                size += len(text)
        if batch:
            stub.PutMemoryRecords(pb.MemoryRecords(store=store, records_json=batch), timeout=CALL_TIMEOUT)
