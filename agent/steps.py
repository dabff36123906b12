"""The steps an agent run is made of, and their outcomes.

Kinds and their arguments (all JSON):
- `llm`: {"messages": [...], "tools": [OpenAI tool schemas], "allow_answer": bool, "call_bias": float,
  "max_calls": int, "max_answer_tokens": int} -> {"calls": [{"name", "arguments"}], "answer", "text", ...}
- `tool`: {"name": str, "arguments": {...}} -> the tool's JSON value
- `memory.write`: {"owner", "namespace", "access"?, "text", "record_id"?, "metadata"?} -> {"record_id"}
- `memory.search`: {"owner", "namespace", "access"?, "query", "k"?} -> {"hits": [{"id", "text", "score"}]}
  (`owner` is the namespace's owner principal, `access` a protocol.memory_access token; see node.task_worker)
- `subagent`: a whole run (agent.runtime.RunSpec) coordinated by another node -> that run's result
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STEP_KINDS = ("llm", "tool", "memory.write", "memory.search", "subagent")
NODE_STEP_KINDS = ("llm", "tool", "memory.write", "memory.search")  # kinds a node's RunStep executes


@dataclass(frozen=True)
class Step:
    """One unit of an agent run, with an id that is the same every time the run is replayed."""

    step_id: str
    kind: str
    args: dict[str, Any]
    idempotent: bool = True  # may run twice (a retry elsewhere after a node failed mid-step)
    prefer_node: str | None = None  # where to run it if that node is up and not much busier (KV-prefix affinity)

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {self.kind!r}; expected one of {STEP_KINDS}")

    @property
    def tool(self) -> str | None:
        return self.args.get("name") if self.kind == "tool" else None

    def describe(self) -> str:
        return f"{self.kind}:{self.tool}" if self.tool else self.kind


@dataclass
class StepOutcome:
    """What a step gave: `value` when `ok`, else `error`; `node_id` ran it (the last node tried)."""

    ok: bool
    value: Any = None
    error: str | None = None
    node_id: str = ""
    seconds: float = 0.0
    tried: list[str] = field(default_factory=list)  # every node it was sent to, in order

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "value": self.value, "error": self.error, "node_id": self.node_id, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> StepOutcome:
        return cls(
            ok=bool(value["ok"]),
            value=value.get("value"),
            error=value.get("error"),
            node_id=str(value.get("node_id", "")),
            seconds=float(value.get("seconds", 0.0)),
        )


class StepFailed(RuntimeError):
    """A step the run cannot do without (e.g. its planning call) failed."""
