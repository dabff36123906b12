"""The SwarmAPI (proto/api.proto) that apps call on any node started with --api-port, with the gRPC
health service and server reflection beside it."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.scheduler import NoCapableNodeError
from node.model_files import ModelSource
from node.service import bind
from proto import api_pb2 as pb
from proto import api_pb2_grpc as pb_grpc
from swarm import dht as swarm_dht
from swarm.agent_client import AgentTask
from swarm.errors import SwarmError

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SwarmAPI"].full_name
MAX_REQUEST_BYTES = 1 << 20
MAX_NEW_TOKENS = 2048
MAX_TASKS = 1024  # task handles kept for GetTask/WatchTask; the oldest finished ones go first
DEFAULT_MAX_NEW_TOKENS = 64


class SwarmApiServicer(pb_grpc.SwarmAPIServicer):
    """Serves the API with a swarm.client.SwarmClient that `client_factory` makes on first use (its own:
    a tokenizer must not be shared between threads that pad differently)."""

    def __init__(self, client_factory: Callable[[], object], model: ModelSource, dht, capabilities: Callable[[], list]):
        self._client_factory, self._client = client_factory, None
        self.model, self.dht = model, dht
        self.capabilities = capabilities
        self._tasks: OrderedDict[str, AgentTask] = OrderedDict()
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
                yield pb.GenerateChunk(text=event.text, token_id=event.token_id)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except SwarmError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the swarm cannot generate now: {error}")
        yield pb.GenerateChunk(finish_reason="length" if produced >= max_new_tokens else "stop")

    # --- agent tasks -------------------------------------------------------------------------------

    def SubmitAgentTask(self, request: pb.AgentTaskRequest, context: grpc.ServicerContext) -> pb.TaskStatus:
        tools = [] if request.no_tools else (list(request.tools) or None)
        try:
            task = self.client().submit_agent_task(
                request.goal,
                tools=tools,
                memory_namespace=request.memory_namespace or None,
                max_steps=request.max_steps or 8,
                strategy=request.strategy or "react",
                tool_choice=request.tool_choice or "auto",
            )
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except NoCapableNodeError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        self._keep(task)
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

    def _keep(self, task: AgentTask) -> None:
        with self._lock:
            self._tasks[task.run_id] = task
            while len(self._tasks) > MAX_TASKS:
                finished = next((task_id for task_id, kept in self._tasks.items() if kept.done), None)
                self._tasks.pop(finished if finished is not None else next(iter(self._tasks)))

    def _task(self, task_id: str, context: grpc.ServicerContext) -> AgentTask:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no task {task_id!r} was submitted through this node")
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
            model=self.model.model_id, num_blocks=self.model.num_blocks, nodes=nodes, min_coverage=_min_coverage(records, self.model.num_blocks)
        )

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsReply:
        records = swarm_dht.fetch_servers(self.dht, self.model.model_id, self.model.num_blocks)
        config = self.model.config
        model = pb.ModelInfo(
            id=self.model.model_id,
            family=str(config.model_type),
            num_blocks=self.model.num_blocks,
            hidden_size=int(config.hidden_size),
            servable=_min_coverage(records, self.model.num_blocks) > 0,
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


def _min_coverage(records, num_blocks: int) -> int:
    counts = [0] * num_blocks
    for record in records:
        for block in range(record.start_block, record.end_block):
            counts[block] += 1
    return min(counts) if counts else 0


# --- access control ----------------------------------------------------------------------------------

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ApiGuard(grpc.ServerInterceptor):
    """Checks the API token (`authorization: Bearer <token>` metadata) and each client's request rate.

    Health checks and reflection stay open. A client is its token when tokens are on, else its address.
    """

    def __init__(self, api_token: str | None, allow: Callable[[str], bool] | None):
        self.api_token = api_token
        self.allow = allow

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        return _guarded(handler, self._check)

    def _check(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        if self.api_token is not None and metadata.get("authorization") != f"Bearer {self.api_token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid API token is needed: metadata authorization: Bearer <token>")
        client = self.api_token or context.peer().rsplit(":", 1)[0]
        if self.allow is not None and not self.allow(client):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit exceeded: slow down and retry")


def _guarded(handler: grpc.RpcMethodHandler, check: Callable[[grpc.ServicerContext], None]) -> grpc.RpcMethodHandler:
    """The same handler, running `check(context)` before the method."""
    if handler.unary_unary is not None:
        method = handler.unary_unary

        def unary_unary(request, context):
            check(context)
            return method(request, context)

        return handler._replace(unary_unary=unary_unary)
    if handler.unary_stream is not None:
        stream = handler.unary_stream

        def unary_stream(request, context):
            check(context)
            yield from stream(request, context)

        return handler._replace(unary_stream=unary_stream)
    return handler  # the API has no client-streaming methods


def start_api_server(
    servicer: SwarmApiServicer,
    host: str,
    port: int,
    guard: ApiGuard,
    tls: tuple[bytes, bytes] | None = None,
    max_workers: int = 16,
) -> tuple[grpc.Server, int]:
    """Serves the API, health checks and reflection on host:port (0 picks a port), over TLS with `tls`
    (certificate PEM, key PEM); returns the server and its port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[guard],
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=4 * max_workers,
    )
    pb_grpc.add_SwarmAPIServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = bind(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} for the API")
    server.start()
    return server, bound
