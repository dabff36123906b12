"""The SwarmAPI (proto/api.proto) that apps call on any node started with --api-port, with the gRPC
health service and server reflection beside it.

Every SwarmAPI call is admitted by `ApiGuard` through the node's `node.api_access.ApiAccess`, shared with
the HTTP API: a token of a configured client makes the call that client's (its principal, limits and
token budget), and refusals are UNAUTHENTICATED, or RESOURCE_EXHAUSTED with a `retry-after` trailer
(seconds). Request bytes that do not parse are INVALID_ARGUMENT (protocol.request_parsing).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any
from urllib.parse import unquote

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from edgeswarm.agent.client import AgentTask
from edgeswarm.agent.scheduler import NoCapableNodeError
from edgeswarm.model.sources import ModelSource
from edgeswarm.node.api_access import ApiAccess, Caller, RateLimited, Unauthenticated
from edgeswarm.node.service import bind
from edgeswarm.partition.coverage import min_coverage
from edgeswarm.proto import api_pb2 as pb
from edgeswarm.proto import api_pb2_grpc as pb_grpc
from edgeswarm.protocol.principals import Principal, principal_of
from edgeswarm.protocol.request_parsing import add_servicer
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm.errors import SwarmError

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SwarmAPI"].full_name
MAX_REQUEST_BYTES = 1 << 20
MAX_NEW_TOKENS = 2048
MAX_TASKS = 1024  # task handles kept for GetTask/WatchTask; the oldest finished ones go first
DEFAULT_MAX_NEW_TOKENS = 64
RETRY_AFTER_METADATA = "retry-after"  # trailer of a RESOURCE_EXHAUSTED refusal: whole seconds to wait


class SwarmApiServicer(pb_grpc.SwarmAPIServicer):
    """Serves the API with a swarm.client.SwarmClient that `client_factory` makes on first use (its own:
    a tokenizer must not be shared between threads that pad differently).

    Behind `ApiGuard`, each call's context carries its caller: generation is checked against and charged
    to the caller's token budget, and a task is visible only to the principal that submitted it."""

    def __init__(self, client_factory: Callable[[], object], model: ModelSource, dht, capabilities: Callable[[], list]):
        self._client_factory, self._client = client_factory, None
        self.model, self.dht = model, dht
        self.capabilities = capabilities
        self._tasks: OrderedDict[str, tuple[AgentTask, Principal | None]] = OrderedDict()  # id -> (task, owner)
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # --- generation --------------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        self._check_model(request.model, context)
        client = self.client()
        if request.messages:
            messages = [{"role": message.role, "content": message.content} for message in request.messages]
            if any(message["role"] not in ("system", "user", "assistant") for message in messages):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "message roles must be system, user or assistant")
            prompt = client.apply_chat_template(messages)
        elif request.prompt:
            prompt = request.prompt
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give a prompt or messages")
        max_new_tokens = request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}]")
        caller = api_caller_of(context)
        if caller is not None:
            _check_budget(caller, max_new_tokens, context)
        options = dict(
            max_new_tokens=max_new_tokens,
            do_sample=request.do_sample,
            temperature=request.temperature or 1.0,
            top_p=request.top_p or 1.0,
            stop=list(request.stop),
            seed=request.seed if request.HasField("seed") else None,
        )
        produced = 0
        try:
            for event in client.stream(prompt, **options):
                if not context.is_active():
                    return
                produced += 1
                if caller is not None:
                    caller.charge(1)
                yield pb.GenerateChunk(text=event.text, token_id=event.token_id)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except SwarmError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the swarm cannot generate now: {error}")
        yield pb.GenerateChunk(finish_reason="length" if produced >= max_new_tokens else "stop")

    # --- agent tasks -------------------------------------------------------------------------------

    def SubmitAgentTask(self, request: pb.AgentTaskRequest, context: grpc.ServicerContext) -> pb.TaskStatus:
        tools = [] if request.no_tools else (list(request.tools) or None)
        principal = principal_of(context)  # the API client the task (and its memory) belongs to; None: anonymous
        if principal is None and request.memory_namespace:  # its memory would be everyone's, the node's own
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "anonymous API callers have no memory namespaces: the node needs --api-token or --api-tokens, and the call a client's token")
        try:
            task = self.client().submit_agent_task(
                request.goal,
                tools=tools,
                memory_namespace=request.memory_namespace or None,
                max_steps=request.max_steps or 8,
                strategy=request.strategy or "react",
                tool_choice=request.tool_choice or "auto",
                principal=principal.id if principal is not None else None,
            )
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except PermissionError as error:  # a memory namespace this client may not use
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
        except NoCapableNodeError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        self._keep(task, principal)
        return _status(task)

    def WatchTask(self, request: pb.WatchTaskRequest, context: grpc.ServicerContext):
        task = self._task(request.task_id, context)
        for seq, event in enumerate(task.events()):
            if not context.is_active():
                return
            if seq > request.after_seq:
                yield pb.TaskEvent(seq=seq, type=event.get("type", ""), event_json=json.dumps(event))

    def GetTask(self, request: pb.TaskRef, context: grpc.ServicerContext) -> pb.TaskStatus:
        return _status(self._task(request.task_id, context))

    def CancelTask(self, request: pb.TaskRef, context: grpc.ServicerContext) -> pb.TaskStatus:
        task = self._task(request.task_id, context)
        try:
            task.cancel()
        except grpc.RpcError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the task's coordinator did not answer: {error.details()}")
        return _status(task)

    def _keep(self, task: AgentTask, owner: Principal | None) -> None:
        with self._lock:
            self._tasks[task.run_id] = (task, owner)
            while len(self._tasks) > MAX_TASKS:
                finished = next((task_id for task_id, (kept, _) in self._tasks.items() if kept.done), None)
                self._tasks.pop(finished if finished is not None else next(iter(self._tasks)))

    def _task(self, task_id: str, context: grpc.ServicerContext) -> AgentTask:
        """The task `task_id`, if the caller submitted it (another's is NOT_FOUND, as a missing one)."""
        with self._lock:
            task, owner = self._tasks.get(task_id, (None, None))
        if task is None or owner != principal_of(context):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no task {task_id!r} was submitted through this node by this client")
        return task

    # --- the swarm -----------------------------------------------------------------------------------

    def SwarmStatus(self, request: pb.SwarmStatusRequest, context: grpc.ServicerContext) -> pb.SwarmStatusReply:
        records = swarm_dht.fetch_servers(self.dht, self.model.model_id, self.model.num_blocks)
        tools = {node.node_id: sorted(node.tools) for node in self.capabilities()}
        nodes = [
            pb.NodeStatus(
                node_id=r.node_id,
                address=r.address,
                start_block=r.start_block,
                end_block=r.end_block,
                throughput=r.throughput,
                tools=tools.get(r.node_id, []),
            )
            for r in records
        ]
        return pb.SwarmStatusReply(
            model=self.model.model_id, num_blocks=self.model.num_blocks, nodes=nodes, min_coverage=min_coverage(records, self.model.num_blocks)
        )

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsReply:
        records = swarm_dht.fetch_servers(self.dht, self.model.model_id, self.model.num_blocks)
        config = self.model.config
        model = pb.ModelInfo(
            id=self.model.model_id,
            family=str(config.model_type),
            num_blocks=self.model.num_blocks,
            hidden_size=int(config.hidden_size),
            servable=min_coverage(records, self.model.num_blocks) > 0,
        )
        return pb.ListModelsReply(models=[model])

    def _check_model(self, model: str, context: grpc.ServicerContext) -> None:
        if model and model != self.model.model_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this swarm serves model {self.model.model_id!r}, not {model!r}")


def _status(task: AgentTask) -> pb.TaskStatus:
    final = task.final_event()
    if final is None:
        return pb.TaskStatus(task_id=task.run_id, status="running", coordinator=task.coordinator)
    return pb.TaskStatus(
        task_id=task.run_id,
        status=final["status"],
        answer=final.get("answer") or "",
        error=final.get("error") or "",
        coordinator=task.coordinator,
    )


# --- access control ----------------------------------------------------------------------------------

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ApiContext:
    """A servicer context that also carries the admitted caller: `principal` (read it with
    protocol.principals.principal_of; None for an anonymous client) and `api_caller` (its budgets)."""

    def __init__(self, context: grpc.ServicerContext, caller: Caller):
        self._context = context
        self.api_caller = caller
        self.principal = caller.principal

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def api_caller_of(context: grpc.ServicerContext) -> Caller | None:
    """The admitted caller of a call (None when the servicer runs without `ApiGuard`)."""
    return getattr(context, "api_caller", None)


class ApiGuard(grpc.ServerInterceptor):
    """Admits each call through `access`, by its `authorization: Bearer <token>` metadata and its peer's
    address, in the handler's own thread. Health checks and reflection stay open."""

    def __init__(self, access: ApiAccess):
        self.access = access

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        token = _bearer_token(handler_call_details.invocation_metadata or ())
        kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
        behaviour = getattr(handler, kind)

        def admitted(request_or_iterator, context):
            return behaviour(request_or_iterator, ApiContext(context, self._admit(token, context)))

        return handler._replace(**{kind: admitted})

    def _admit(self, token: str | None, context: grpc.ServicerContext) -> Caller:
        try:
            return self.access.admit(token, peer_address(context.peer()))
        except Unauthenticated as refusal:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(refusal))
        except RateLimited as refusal:
            _abort_rate_limited(refusal, context)


def _check_budget(caller: Caller, max_tokens: int, context: grpc.ServicerContext) -> None:
    try:
        caller.check_tokens(max_tokens)
    except RateLimited as refusal:
        _abort_rate_limited(refusal, context)


def _abort_rate_limited(refusal: RateLimited, context: grpc.ServicerContext) -> None:
    context.set_trailing_metadata(((RETRY_AFTER_METADATA, str(refusal.retry_after)),))
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(refusal))


def _bearer_token(metadata: Iterable[tuple[str, Any]]) -> str | None:
    value = dict(metadata).get("authorization")
    if isinstance(value, str) and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def peer_address(peer: str) -> str:
    """The IP address in a gRPC peer string ("ipv4:10.0.0.7:5000", "ipv6:[::1]:5000"; else the string)."""
    kind, _, rest = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def start_api_server(
    servicer: SwarmApiServicer,
    host: str,
    port: int,
    access: ApiAccess,
    tls: tuple[bytes, bytes] | None = None,
    max_workers: int = 16,
) -> tuple[grpc.Server, int]:
    """Serves the API (admitted through `access`), health checks and reflection on host:port (0 picks a
    port), over TLS with `tls` (certificate PEM, key PEM); returns the server and its port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[ApiGuard(access)],
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=4 * max_workers,
    )
    add_servicer(pb_grpc.add_SwarmAPIServicer_to_server, servicer, server)
    health_servicer = health.HealthServicer()
    add_servicer(health_pb2_grpc.add_HealthServicer_to_server, health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    add_servicer(reflection_pb2_grpc.add_ServerReflectionServicer_to_server, reflection.ReflectionServicer(names), server)
    bound = bind(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} for the API")
    server.start()
    return server, bound
