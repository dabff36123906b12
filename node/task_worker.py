"""The steps a node runs for agents: its tools, its share of the swarm's memory, and llm calls.

A memory step names a namespace by its owner's principal id and its name; the node keeps its records
under the namespace's storage id (agent.memory_placement). It runs only for the owner calling itself, or
for a caller presenting an access token of the owner (protocol.memory_access) for that namespace and
right: "read" for memory.search, "write" for memory.write.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from edgeswarm.agent.memory_placement import storage_id
from edgeswarm.agent.tools import (
    CODE_TOOLS,
    ToolArgumentError,
    ToolRegistry,
    UnknownToolError,
)
from edgeswarm.agent.vector_store import VectorStore
from edgeswarm.node.llm_worker import LLMWorker
from edgeswarm.protocol.memory_access import (
    READ,
    WRITE,
    MemoryAccessError,
    check_access,
)
from edgeswarm.protocol.principals import Principal

MAX_SEARCH_HITS = 20
RIGHT_NEEDED = {"memory.search": READ, "memory.write": WRITE}


class StepError(ValueError):
    """A step this node cannot run as asked: bad arguments, an unknown tool, a tool that failed."""


class TaskWorker:
    """Executes node steps (see agent.steps). Safe to call from many threads."""

    def __init__(
        self, node_id: str, tools: ToolRegistry, memory: VectorStore | None, llm: LLMWorker | None, swarm_key: bytes | None = None
    ):
        """`swarm_key`: the private swarm's key, which memory storage ids are keyed with (None: open swarm)."""
        self.node_id = node_id
        self.swarm_key = swarm_key
        self.tools = tools
        self.memory = memory
        self.llm = llm
        self._lock = threading.Lock()
        self._running = 0

    @property
    def running_steps(self) -> int:
        with self._lock:
            return self._running

    def authorize(self, kind: str, args: dict, caller: Principal | None) -> None:
        """Checks that `caller` may run this step: raises MemoryAccessError (a memory step the caller may
        not run, saying why) or StepError (a malformed memory step). Other kinds need no more than the
        call's own authentication."""
        right = RIGHT_NEEDED.get(kind)
        if right is None:
            return
        owner, name = _string(args, "owner"), _string(args, "namespace")
        store = self._storage_id(owner, name)
        if caller is not None and caller.id == owner:
            return
        token = args.get("access")
        if token is None:
            raise MemoryAccessError(
                f"memory namespace {name!r} belongs to {owner}: {caller.id if caller else 'an anonymous caller'} "
                "needs an access token from its owner (SwarmClient.grant)"
            )
        check_access(token, owner, store, right, caller.id if caller else None)

    def execute(self, run_id: str, kind: str, args: dict, on_text: Callable[[str], None] | None = None) -> Any:
        """Runs one step here and returns its JSON value; raises StepError when it cannot. The caller must
        have passed `authorize` first."""
        with self._lock:
            self._running += 1
        try:
            if kind == "tool":
                return self._tool(args)
            if kind == "memory.write":
                return self._memory_write(args)
            if kind == "memory.search":
                return self._memory_search(args)
            if kind == "llm":
                if self.llm is None:
                    raise StepError(f"node {self.node_id} runs no llm steps")
                return self.llm.run(run_id, args, on_text)
            raise StepError(f"unknown step kind {kind!r}")
        except (ToolArgumentError, UnknownToolError) as error:
            raise StepError(str(error)) from error
        finally:
            with self._lock:
                self._running -= 1

    def end_run(self, run_id: str) -> None:
        """Frees what this node keeps for a run that has ended: its llm session, if any."""
        if self.llm is not None:
            self.llm.forget(run_id)

    def _tool(self, args: dict) -> Any:
        name = args.get("name")
        if not isinstance(name, str):
            raise StepError("a tool step needs the tool's name")
        if name in CODE_TOOLS and name not in self.tools:
            raise StepError(f"tool {name!r} runs code and is off on node {self.node_id}: its operator enables it with --allow-tools {name}")
        result = self.tools.call(name, args.get("arguments"))
        if not result.ok:
            raise StepError(f"{name} failed: {result.error}")
        return result.value

    def _store(self) -> VectorStore:
        if self.memory is None:
            raise StepError(f"node {self.node_id} keeps no memory")
        return self.memory

    def _storage_id(self, owner: str, name: str) -> str:
        try:
            return storage_id(owner, name, self.swarm_key)
        except ValueError as error:
            raise StepError(str(error)) from error

    def _memory_write(self, args: dict) -> dict:
        store = self._storage_id(_string(args, "owner"), _string(args, "namespace"))
        record = self._store().write(store, _string(args, "text"), metadata=args.get("metadata"), record_id=args.get("record_id"))
        return {"record_id": record.id}

    def _memory_search(self, args: dict) -> dict:
        k = args.get("k", 5)
        if not isinstance(k, int) or not 1 <= k <= MAX_SEARCH_HITS:
            raise StepError(f"k must be an int in [1, {MAX_SEARCH_HITS}]")
        store = self._storage_id(_string(args, "owner"), _string(args, "namespace"))
        hits = self._store().search(store, _string(args, "query"), k=k)
        return {"hits": [{"id": record.id, "text": record.text, "score": round(score, 4)} for record, score in hits]}


def _string(args: dict, name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise StepError(f"{name!r} must be a string")
    return value
