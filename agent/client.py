"""`SwarmClient`, the client of the whole swarm: the model client (edgeswarm.swarm.client.ModelClient) plus
agent runs, submitted to a coordinator node and followed (`AgentTask`), and the swarm's memory, read and
written with access tokens (protocol.memory_access) that the client signs: for its own namespaces as their
owner, for others' by delegating the owner's grant."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from typing import Any

import grpc

from edgeswarm.agent.capabilities import CapabilityDirectory
from edgeswarm.agent.run_client import FINISHED, RunFollower, RunLocation, RunLostError
from edgeswarm.agent.runtime import RunSpec
from edgeswarm.agent.scheduler import ACCESS_DENIED, NoCapableNodeError, StepScheduler
from edgeswarm.agent.steps import Step
from edgeswarm.proto import tasks_pb2 as pb
from edgeswarm.proto import tasks_pb2_grpc as pb_grpc
from edgeswarm.protocol.constants import RUN_START_TIMEOUT
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.memory_access import (
    READ,
    WRITE,
    MemoryAccessError,
    check_access,
    issue_access,
    read_access,
)
from edgeswarm.protocol.principals import Principal
from edgeswarm.swarm.client import ModelClient
from edgeswarm.swarm.errors import SwarmError
from edgeswarm.swarm.routes import Banlist

MEMORY_CALL_TTL = 120.0  # seconds the access token of one remember/recall lives
RUN_MEMORY_TTL = 3600.0  # seconds the access token an agent run carries for its memory lives
DEFAULT_GRANT_TTL = 7 * 24 * 3600.0


class AgentRunError(SwarmError):
    """The run failed, was cancelled, or was lost with every node that could carry it on."""


class MemoryAccessDenied(AgentRunError, PermissionError):
    """A memory node refused this client access to a namespace (not its own, and no valid grant)."""


class AgentTask:
    """A submitted agent run. Events are collected in the background from the moment it is submitted, so
    `events()` always starts from the first one; `result()` waits for the answer."""

    def __init__(self, follower: RunFollower):
        self._follower = follower
        self._events: list[dict] = []
        self._finished = threading.Event()
        self._changed = threading.Condition()
        self._error: Exception | None = None
        threading.Thread(target=self._collect, name=f"agent-{self.run_id[:8]}", daemon=True).start()

    @property
    def run_id(self) -> str:
        return self._follower.location.run_id

    @property
    def coordinator(self) -> str:
        """The node coordinating the run now (it changes if the run was taken over)."""
        return self._follower.location.coordinator

    def _collect(self) -> None:
        try:
            for event in self._follower.events():
                with self._changed:
                    self._events.append(event)
                    self._changed.notify_all()
        except (RunLostError, grpc.RpcError) as error:
            self._error = error
        finally:
            self._finished.set()
            with self._changed:
                self._changed.notify_all()

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Every event of the run, in order: "run.started", "step.started" / "step.finished" (with the node
        that ran it), "token", "plan", "message", "answer", ..., "run.finished"."""
        index = 0
        while True:
            with self._changed:
                if index >= len(self._events) and not self._finished.is_set():
                    if not self._changed.wait(timeout=timeout) and timeout is not None:
                        raise TimeoutError(f"no event of run {self.run_id} within {timeout}s")
                pending, done = self._events[index:], self._finished.is_set()
            yield from pending
            index += len(pending)
            if done and index >= len(self._events):
                return

    def result(self, timeout: float | None = None) -> str:
        """The final answer; raises AgentRunError if the run failed or was cancelled, TimeoutError if late."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"run {self.run_id} has not finished within {timeout}s")
        final = self.final_event()
        if final is None:
            raise AgentRunError(f"run {self.run_id} was lost: {self._error}")
        if final["status"] != "succeeded":
            raise AgentRunError(f"run {self.run_id} {final['status']}: {final.get('error')}")
        return final.get("answer") or ""

    def final_event(self) -> dict | None:
        """The "run.finished" event, once the run has ended (None before)."""
        with self._changed:
            return next((event for event in reversed(self._events) if event.get("type") == FINISHED), None)

    def cancel(self) -> None:
        """Asks the coordinator to stop the run; in-flight steps are cancelled and it ends "cancelled"."""
        self._follower.cancel()

    @property
    def done(self) -> bool:
        return self._finished.is_set()


class AgentGateway:
    """What `SwarmClient` uses for agents: the capability records, a scheduler for memory steps, and the
    client's identity, which owns its memory namespaces and signs their access tokens."""

    def __init__(self, dht, model_id: str, identity: NodeIdentity, swarm_key: bytes | None = None, banlist: Banlist | None = None):
        self.directory = CapabilityDirectory(dht, model_id)
        self.scheduler = StepScheduler(self.directory, swarm_key=swarm_key, identity=identity, banlist=banlist)
        self.identity = identity

    def acting_for(self, principal: str | None) -> str:
        """The principal id this client acts for: its own key's, or an API principal of the node whose key
        it holds (`<node id>/api:<name>`); ValueError for one its key does not vouch for."""
        if principal is None:
            return self.identity.fingerprint
        if not isinstance(principal, str) or Principal(principal).key_id != self.identity.fingerprint:
            raise ValueError(f"this client's key ({self.identity.fingerprint}) cannot act for principal {principal!r}")
        return principal

    def grant(self, namespace: str, grantee: str, rights: Iterable[str], ttl: float, principal: str | None = None) -> str:
        """A token letting `grantee` use `rights` on this client's (or `principal`'s) namespace for `ttl` s."""
        if not isinstance(grantee, str) or not grantee:
            raise ValueError("a grant names its grantee's principal id")
        owner = self.acting_for(principal)
        return issue_access(self.identity, owner, self.scheduler.storage_id(owner, namespace), rights, ttl, grantee=grantee)

    def memory_access(
        self, namespace: str, rights: Iterable[str], ttl: float, access: str | None = None, principal: str | None = None
    ) -> tuple[str, str]:
        """(owner, token) for memory steps on `namespace` with `rights`, valid for at most `ttl` s: the
        client's own namespace (as owner), or, given `access` (a grant to this client), the granting
        owner's, by a token that delegates the grant. MemoryAccessError if the grant cannot give that."""
        rights = sorted(set(rights))
        me = self.acting_for(principal)
        if access is None:
            store = self.scheduler.storage_id(me, namespace)
            return me, issue_access(self.identity, me, store, rights, ttl)
        grant = read_access(access)
        owner = grant.owner
        store = self.scheduler.storage_id(owner, namespace)
        if not grant.grantee:  # a bearer token: whoever holds it may use it as it is
            token = access
        elif grant.grantee != me:
            raise MemoryAccessError(f"this memory grant is for {grant.grantee}, not for {me}")
        else:
            remaining = grant.expires_at - time.time()
            if remaining <= 0:
                raise MemoryAccessError(f"this memory grant expired {-remaining:.0f} s ago")
            token = issue_access(self.identity, owner, store, rights, min(ttl, remaining), parent=access)
        for right in rights:
            check_access(token, owner, store, right, caller=None)
        return owner, token

    def submit(self, spec: RunSpec, run_id: str | None = None, coordinator: str | None = None) -> AgentTask:
        """Starts the run on `coordinator` (a node id) or else the least loaded node that accepts it."""
        run_id = run_id or uuid.uuid4().hex
        candidates = self.scheduler.place_run()
        if coordinator is not None:
            candidates = [node for node in candidates if node.node_id == coordinator]
            if not candidates:
                raise NoCapableNodeError(f"node {coordinator} does not coordinate agent runs here")
        errors = []
        for node in candidates:
            try:
                stub = pb_grpc.TaskServiceStub(self.scheduler.channel(node.address, node.node_id))
                reply = stub.StartRun(pb.RunRequest(run_id=run_id, spec_json=json.dumps(spec.to_dict())), timeout=RUN_START_TIMEOUT)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(error.details()) from error
                if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                    raise MemoryAccessDenied(error.details()) from error
                errors.append(f"{node.node_id}: {error.details()}")
                self.scheduler.ban(node.node_id)
                continue
            return AgentTask(RunFollower(RunLocation.from_reply(reply), self.scheduler.channel))
        raise NoCapableNodeError(f"no node coordinates agent runs ({'; '.join(errors) or 'none announced'})")

    def memory_step(self, kind: str, args: dict[str, Any]) -> Any:
        """Runs a memory step from this client; MemoryAccessDenied or AgentRunError if it fails."""
        outcome = self.scheduler.run("client", Step(f"client.{uuid.uuid4().hex[:8]}", kind, args))
        if not outcome.ok:
            raise (MemoryAccessDenied if (outcome.error or "").startswith(ACCESS_DENIED) else AgentRunError)(outcome.error)
        return outcome.value

    def close(self) -> None:
        self.scheduler.close()


class SwarmClient(ModelClient):
    """A client of the swarm: it generates with the model (ModelClient) and runs agent tasks, and reads and
    writes the swarm's memory, as its identity's principal.

    >>> client = SwarmClient(initial_peers=["/ip4/127.0.0.1/tcp/31337/p2p/12D3Koo..."])  # or SwarmClient() on a LAN
    >>> client.submit_agent_task("What is 1234 * 5678?", tools=["calculator"]).result()
    """

    @cached_property
    def agents(self) -> AgentGateway:
        return AgentGateway(self.dht, self.model.model_id, self.identity, self.swarm_key, self.routes.banlist)

    def close(self) -> None:
        if "agents" in self.__dict__:
            self.agents.close()
        super().close()

    def __enter__(self) -> SwarmClient:
        return self

    def submit_agent_task(
        self,
        goal: str,
        tools: Sequence[str] | None = None,
        memory_namespace: str | None = None,
        max_steps: int = 8,
        strategy: str = "react",
        plan: list[dict] | None = None,
        max_answer_tokens: int = 96,
        tool_choice: str = "auto",
        coordinator: str | None = None,
        memory_access: str | None = None,
        principal: str | None = None,
    ) -> AgentTask:
        """Starts an agent run on a coordinator node and returns its handle (`events()`, `result()`, `cancel()`).

        `tools`: names of tools the run may call (None: every tool a node hosts). `memory_namespace`: the
        long-term memory it reads facts from and remembers its answer in: this client's own namespace of
        that name, or, with `memory_access` (a grant from its owner, see `grant`), the owner's; a read-only
        grant lets the run read but not remember. `principal`: the API principal this call acts for (a
        node's APIs: `<node id>/api:<name>`, with the node's identity). `strategy`: "react",
        "plan" (plan-and-execute; `plan` gives the calls instead of asking the model) or "team"
        (planner, parallel worker sub-agents, critic). `tool_choice` as OpenAI's: "auto", "required" (the
        first decision must call a tool) or "none". `coordinator`: the node id to coordinate the run (default:
        the least loaded). Bad arguments raise ValueError; a namespace the client may not use raises
        PermissionError (protocol.memory_access.MemoryAccessError or MemoryAccessDenied).
        """
        owner = token = None
        remember = True
        if memory_namespace is not None:
            remember = memory_access is None or WRITE in read_access(memory_access).rights
            rights = (READ, WRITE) if remember else (READ,)
            owner, token = self.agents.memory_access(memory_namespace, rights, RUN_MEMORY_TTL, memory_access, principal)
        spec = RunSpec(
            goal=goal,
            tools=None if tools is None else list(tools),
            memory_namespace=memory_namespace,
            memory_owner=owner,
            memory_access=token,
            remember=remember,
            max_steps=max_steps,
            strategy=strategy,
            plan=plan,
            max_answer_tokens=max_answer_tokens,
            tool_choice=tool_choice,
        )
        return self.agents.submit(spec, coordinator=coordinator)

    def remember(
        self, namespace: str, text: str, record_id: str | None = None, access: str | None = None, principal: str | None = None
    ) -> list[str]:
        """Writes a fact to long-term memory: this client's namespace, or with `access` (a grant with
        "write") its owner's. Returns the nodes holding it: it succeeds only once every replica (2) does,
        and raises AgentRunError naming what is missing otherwise (writing again is harmless: the record
        id makes it idempotent). MemoryAccessDenied / MemoryAccessError if the namespace is not open to it."""
        owner, token = self.agents.memory_access(namespace, (WRITE,), MEMORY_CALL_TTL, access, principal)
        args = {"owner": owner, "namespace": namespace, "access": token, "text": text, **({"record_id": record_id} if record_id else {})}
        return self.agents.memory_step("memory.write", args)["replicas"]

    def recall(self, namespace: str, query: str, k: int = 5, access: str | None = None, principal: str | None = None) -> list[dict]:
        """The `k` records of a namespace (this client's, or with `access` a grant's owner's) closest to
        `query`: [{"id", "text", "score"}], best first, merged from every live replica."""
        owner, token = self.agents.memory_access(namespace, (READ,), MEMORY_CALL_TTL, access, principal)
        args = {"owner": owner, "namespace": namespace, "access": token, "query": query, "k": k}
        return self.agents.memory_step("memory.search", args)["hits"]

    def grant(
        self, namespace: str, grantee: str, rights: Sequence[str] = (READ,), ttl: float = DEFAULT_GRANT_TTL, principal: str | None = None
    ) -> str:
        """A token that lets the principal `grantee` (a client's `identity.fingerprint`, or an API principal
        `<node id>/api:<name>`) use `rights` ("read", "write") on this client's namespace for `ttl` seconds.
        The grantee passes it as `access=` / `memory_access=`. `principal`: as in `submit_agent_task`."""
        return self.agents.grant(namespace, grantee, rights, ttl, principal)
