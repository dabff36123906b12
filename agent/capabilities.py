"""What a node can do for agents, as it announces it in the DHT: its tools, its memory, its load."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeswarm.agent.memory_placement import is_storage_id
from edgeswarm.agent.tools import TOOL_NAME_PATTERN, ToolRegistry
from edgeswarm.protocol.channels import register_certificate
from edgeswarm.protocol.records import MAX_CERT_CHARS
from edgeswarm.swarm import dht as swarm_dht

logger = logging.getLogger(__name__)

MAX_TOOLS = 256
MAX_NAMESPACES = 256


def tasks_key(model_id: str) -> str:
    """The DHT key under which every node that takes agent steps for `model_id` announces itself."""
    return f"edgeswarm.v1.{model_id}.tasks"


@dataclass(frozen=True)
class TaskCapabilities:
    """One node's offer of agent work.

    `tools` maps each hosted tool to its {"description", "parameters", "idempotent"} (idempotent: safe to
    run twice). `namespaces` are the storage ids (agent.memory_placement: keyed hashes, never names) of
    the memory namespaces it holds records of; `free_cpu` is the idle fraction of its cores and
    `running_steps` how many steps it is running, for least-loaded placement.
    """

    node_id: str
    address: str  # host:port of its gRPC server (TaskService beside the data plane)
    tools: dict[str, dict] = field(default_factory=dict)
    memory: bool = True  # it keeps vector memory (and takes memory.write / memory.search steps)
    namespaces: tuple[str, ...] = ()  # storage ids
    llm: bool = True  # it can run llm steps (it drives the model pipeline as a client)
    coordinator: bool = True  # it coordinates runs
    free_cpu: float = 1.0
    running_steps: int = 0
    tls_cert: str = ""  # as in its server record: TLS certificate bound to its identity, or "" for plaintext

    def can_run(self, kind: str, tool: str | None = None) -> bool:
        """Whether this node takes steps of `kind` (and, for tool steps, hosts `tool`)."""
        if kind == "tool":
            return tool in self.tools
        if kind.startswith("memory."):
            return self.memory
        if kind == "llm":
            return self.llm
        if kind == "run":
            return self.coordinator
        return False

    def to_dict(self) -> dict[str, Any]:
        value = asdict(self)
        value["namespaces"] = list(self.namespaces)
        return value

    @classmethod
    def from_dict(cls, value: Any) -> TaskCapabilities:
        """Parses a DHT value, raising ValueError if it is malformed."""
        if not isinstance(value, dict):
            raise ValueError(f"capabilities are a {type(value).__name__}, not a dict")
        try:
            tools = value.get("tools", {})
            namespaces = value.get("namespaces", [])
            if not isinstance(tools, dict) or len(tools) > MAX_TOOLS:
                raise ValueError(f"tools must be a dict of at most {MAX_TOOLS} entries")
            if not isinstance(namespaces, (list, tuple)) or len(namespaces) > MAX_NAMESPACES:
                raise ValueError(f"namespaces must be a list of at most {MAX_NAMESPACES}")
            capabilities = cls(
                node_id=str(value["node_id"]),
                address=str(value["address"]),
                tools={str(name): _tool_info(info) for name, info in tools.items()},
                memory=bool(value.get("memory", True)),
                namespaces=tuple(str(namespace) for namespace in namespaces),
                llm=bool(value.get("llm", True)),
                coordinator=bool(value.get("coordinator", True)),
                free_cpu=float(value.get("free_cpu", 1.0)),
                running_steps=int(value.get("running_steps", 0)),
                tls_cert=str(value.get("tls_cert", ""))[:MAX_CERT_CHARS],
            )
        except (KeyError, TypeError, ValueError, OverflowError) as error:  # OverflowError: int(inf), float(10**400)
            raise ValueError(f"malformed capabilities: {error!r}") from error
        bad = [name for name in capabilities.tools if not TOOL_NAME_PATTERN.match(name)]
        if bad:
            raise ValueError(f"malformed tool names {bad[:3]}")
        if not all(is_storage_id(store) for store in capabilities.namespaces):
            raise ValueError("namespaces must be storage ids (32 lowercase hex characters)")
        if not 0.0 <= capabilities.free_cpu <= 1.0 or capabilities.running_steps < 0:
            raise ValueError(f"load out of range: free_cpu {capabilities.free_cpu}, running {capabilities.running_steps}")
        return capabilities


class CapabilityDirectory:
    """The swarm's task capability records, read from the DHT at most every `max_age` seconds."""

    def __init__(self, dht, model_id: str, max_age: float = 1.0):
        self.dht, self.model_id, self.max_age = dht, model_id, max_age
        self._lock = threading.Lock()
        self._cached: list[TaskCapabilities] = []
        self._read_at = -float("inf")

    def __call__(self) -> list[TaskCapabilities]:
        with self._lock:
            if time.monotonic() - self._read_at > self.max_age:
                self._cached = fetch_capabilities(self.dht, self.model_id)
                self._read_at = time.monotonic()
            return list(self._cached)

    def tool_catalog(self) -> dict[str, dict]:
        """Every tool some node hosts: name -> {"description", "parameters", "idempotent"}."""
        catalog: dict[str, dict] = {}
        for node in self():
            for name, info in node.tools.items():
                catalog.setdefault(name, info)
        return catalog


def fetch_capabilities(dht, model_id: str) -> list[TaskCapabilities]:
    """The well-formed capability records of the swarm, by node id; malformed ones are logged and skipped."""
    nodes = []
    for subkey, value in swarm_dht.fetch_subkeys(dht, tasks_key(model_id)).items():
        try:
            capabilities = TaskCapabilities.from_dict(value)
        except ValueError as error:
            logger.warning("ignoring task capabilities %r: %s", subkey, error)
            continue
        if capabilities.node_id != subkey:
            continue
        if capabilities.tls_cert and not register_certificate(capabilities.node_id, capabilities.tls_cert):
            continue
        nodes.append(capabilities)
    return sorted(nodes, key=lambda node: node.node_id)


def announce_capabilities(dht, model_id: str, capabilities: TaskCapabilities, ttl: float) -> bool:
    return swarm_dht.store_subkey(dht, tasks_key(model_id), capabilities.node_id, capabilities.to_dict(), ttl)


def _tool_info(info: Any) -> dict:
    if not isinstance(info, dict) or not isinstance(info.get("parameters"), dict):
        raise ValueError("a tool needs a description, a parameters schema and idempotent")
    return {"description": str(info.get("description", ""))[:1024], "parameters": info["parameters"], "idempotent": bool(info.get("idempotent"))}


def hosted_tools(registry: ToolRegistry) -> dict[str, dict]:
    """A registry's tools as capability records list them."""
    tools = {}
    for name in registry.names():
        spec = registry.get(name)
        tools[name] = {"description": spec.description, "parameters": spec.parameters, "idempotent": spec.idempotent}
    return tools
