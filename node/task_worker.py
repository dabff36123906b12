"""The steps a node runs for agents: its tools, its share of the swarm's memory, and llm calls."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from agent.memory import VectorStore
from agent.tools import ToolArgumentError, ToolRegistry, UnknownToolError
from node.llm_worker import LLMWorker

MAX_SEARCH_HITS = 20


class StepError(ValueError):
    """A step this node cannot run as asked: bad arguments, an unknown tool, a tool that failed."""


class TaskWorker:
    """Executes node steps (see agent.steps). Safe to call from many threads."""

    def __init__(self, node_id: str, tools: ToolRegistry, memory: VectorStore | None, llm: LLMWorker | None):
        self.node_id = node_id
        self.tools = tools
        self.memory = memory
        self.llm = llm
        self._lock = threading.Lock()
        self._running = 0

    @property
    def running_steps(self) -> int:
        with self._lock:
            return self._running

    def execute(self, run_id: str, kind: str, args: dict, on_text: Callable[[str], None] | None = None) -> Any:
        """Runs one step here and returns its JSON value; raises StepError when it cannot."""
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
        result = self.tools.call(name, args.get("arguments"))
        if not result.ok:
            raise StepError(f"{name} failed: {result.error}")
        return result.value

    def _store(self) -> VectorStore:
        if self.memory is None:
            raise StepError(f"node {self.node_id} keeps no memory")
        return self.memory

    def _memory_write(self, args: dict) -> dict:
        record = self._store().write(
            _string(args, "namespace"), _string(args, "text"), metadata=args.get("metadata"), record_id=args.get("record_id")
        )
        return {"record_id": record.id}

    def _memory_search(self, args: dict) -> dict:
        k = args.get("k", 5)
        if not isinstance(k, int) or not 1 <= k <= MAX_SEARCH_HITS:
            raise StepError(f"k must be an int in [1, {MAX_SEARCH_HITS}]")
        hits = self._store().search(_string(args, "namespace"), _string(args, "query"), k=k)
        return {"hits": [{"id": record.id, "text": record.text, "score": round(score, 4)} for record, score in hits]}


def _string(args: dict, name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise StepError(f"{name!r} must be a string")
    return value
