"""Everything a node does for agents, wired together: tools, memory and its replication, the run journal,
llm steps, the step scheduler, the run coordinator, the TaskService, and the capability record in the DHT."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
import hivemind
import psutil

from edgeswarm.agent.capabilities import (
    MAX_NAMESPACES,
    CapabilityDirectory,
    TaskCapabilities,
    announce_capabilities,
    hosted_tools,
)
from edgeswarm.agent.client import SwarmClient
from edgeswarm.agent.coordinator import RunCoordinator
from edgeswarm.agent.embeddings import LazyEmbedder
from edgeswarm.agent.journal import Journal
from edgeswarm.agent.memory_placement import is_storage_id
from edgeswarm.agent.memory_replication import MemoryReplicator
from edgeswarm.agent.scheduler import StepScheduler
from edgeswarm.agent.tools import ToolRegistry, ToolSpec, builtin_tools, load_tools_file
from edgeswarm.agent.vector_store import VectorStore
from edgeswarm.model.sources import ModelSource
from edgeswarm.node.llm_worker import LLMWorker
from edgeswarm.node.task_service import TaskServicer, add_task_service
from edgeswarm.node.task_worker import TaskWorker
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm.policy import SessionPolicy
from edgeswarm.swarm.routes import Banlist

logger = logging.getLogger(__name__)


class AgentServices:
    """A node's agent side. Its memory and journal live in `data_dir`."""

    def __init__(
        self,
        node_id: str,
        address: str,
        model: ModelSource,
        dht: hivemind.DHT,
        data_dir: str,
        tools_file: str | None = None,
        tls_cert: str = "",
        swarm_key: bytes | None = None,
        allow_tools: tuple[str, ...] = (),
        session_policy: SessionPolicy | None = None,
    ):
        """`swarm_key`: the private swarm's key (memory storage ids are keyed with it); None: an open swarm.
        `allow_tools`: the built-in tools that run code (``python``) this node hosts; none unless its operator says so.
        `session_policy`: how this node's own clients (llm steps and the APIs) run sessions, e.g. their
        spot-check rate (`--spot-check`); None: SessionPolicy's defaults."""
        self.node_id, self.address, self.model, self.dht = node_id, address, model, dht
        self.tls_cert = tls_cert
        self.swarm_key = swarm_key
        self.session_policy = session_policy
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.tools = ToolRegistry(builtin_tools(allow_tools))
        self.tools.register(self._swarm_status_tool())
        if tools_file:
            for spec in load_tools_file(tools_file):
                self.tools.register(spec)
        self.memory = VectorStore(str(Path(data_dir) / "memory.sqlite"), LazyEmbedder())
        self.journal = Journal(str(Path(data_dir) / "journal.sqlite"))
        self._client_lock = threading.Lock()
        self._swarm_client = None
        self.llm = LLMWorker(lambda: self.swarm_client)
        self.worker = TaskWorker(node_id, self.tools, self.memory, self.llm, swarm_key)
        self.directory = CapabilityDirectory(dht, model.model_id)
        self.banlist = Banlist()  # shared by the scheduler and this node's swarm clients (swarm.routes)
        self.scheduler = StepScheduler(self.directory, swarm_key=swarm_key, banlist=self.banlist)
        self.coordinator = RunCoordinator(node_id, address, self.journal, self.scheduler, self.directory.tool_catalog)
        self.replicator = MemoryReplicator(node_id, self.memory, self.directory, self.scheduler.channel)
        self.replicator.start()
        psutil.cpu_percent(interval=None)  # starts the measurement window of `free_cpu`

    @property
    def swarm_client(self):
        """This node as a client of the swarm, made on first use, for llm steps."""
        with self._client_lock:
            if self._swarm_client is None:
                self._swarm_client = self.new_swarm_client()
            return self._swarm_client

    def new_swarm_client(self):
        """A client of the swarm over this node's own DHT peer (the APIs each make their own)."""

        policy = self.session_policy or SessionPolicy()
        return SwarmClient(model=self.model, dht=self.dht, swarm_key=self.swarm_key, policy=policy, banlist=self.banlist)

    def _swarm_status_tool(self) -> ToolSpec:
        def swarm_status() -> dict:
            records = swarm_dht.fetch_servers(self.dht, self.model.model_id, self.model.num_blocks)
            nodes = [{"node_id": r.node_id, "blocks": [r.start_block, r.end_block], "address": r.address} for r in records]
            return {"model": self.model.model_id, "num_blocks": self.model.num_blocks, "nodes": nodes}

        return ToolSpec(
            name="swarm_status",
            description="List the nodes of the swarm and the model blocks each one serves.",
            parameters={"type": "object", "properties": {}},
            idempotent=True,
            function=swarm_status,
        )

    def add_to(self, server: grpc.Server) -> None:
        add_task_service(server, TaskServicer(self.worker, self.coordinator, self.replicator))

    def capabilities(self) -> TaskCapabilities:
        return TaskCapabilities(
            node_id=self.node_id,
            address=self.address,
            tools=hosted_tools(self.tools),
            memory=True,
            namespaces=tuple([store for store in self.memory.namespaces() if is_storage_id(store)][:MAX_NAMESPACES]),
            free_cpu=max(0.0, min(1.0, 1.0 - psutil.cpu_percent(interval=None) / 100.0)),
            running_steps=self.worker.running_steps,
            tls_cert=self.tls_cert,
        )

    def announce(self, ttl: float) -> bool:
        return announce_capabilities(self.dht, self.model.model_id, self.capabilities(), ttl)

    def close(self) -> None:
        self.replicator.close()
        self.coordinator.close()
        self.llm.close()
        self.scheduler.close()
        if self._swarm_client is not None:
            self._swarm_client.close()
