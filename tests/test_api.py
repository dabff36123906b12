"""The SwarmAPI on real nodes: a client built from proto/api.proto alone, health checks, reflection,
tokens, named API clients with token budgets shared with the HTTP API, rate limits and bad requests."""

import json
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgeswarm import SwarmClient
from edgeswarm.node.api_access import token_digest
from edgeswarm.node.api_service import RETRY_AFTER_METADATA
from devtools.launcher import LocalSwarm
from edgeswarm.proto import api_pb2 as pb
from edgeswarm.proto import api_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]
TINY_TOKEN = "tiny-budget-token"  # the API client "tiny" of node 0's tokens file: 1 generated token a minute
TINY = [("authorization", f"Bearer {TINY_TOKEN}")]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tokens_file = tmp_path_factory.mktemp("api") / "tokens.json"
    tokens_file.write_text(json.dumps({"clients": [{"name": "tiny", "token_sha256": token_digest(TINY_TOKEN), "tokens_per_minute": 1}]}))
    with LocalSwarm(
        [
            ["--num-blocks", "15", "--api-port", "0", "--http-port", "0", "--api-token", TOKEN, "--api-tokens", str(tokens_file)],
            ["--num-blocks", "15", "--api-port", "0", "--api-rate", "1"],
        ]
    ) as local_swarm:
        yield local_swarm


@pytest.fixture(scope="module")
def api(swarm):
    with grpc.insecure_channel(swarm.nodes[0].info["api_address"]) as channel:
        yield pb_grpc.SwarmAPIStub(channel)


CLIENT_FROM_PROTO = textwrap.dedent(
    """
    import json, sys
    import grpc
    sys.path.insert(0, sys.argv[1])
    import api_pb2, api_pb2_grpc
    stub = api_pb2_grpc.SwarmAPIStub(grpc.insecure_channel(sys.argv[2]))
    auth = [("authorization", "Bearer " + sys.argv[3])]
    request = api_pb2.GenerateRequest(messages=[api_pb2.ChatMessage(role="user", content="What is the capital of France?")], max_new_tokens=12)
    chunks = list(stub.Generate(request, metadata=auth, timeout=120))
    models = stub.ListModels(api_pb2.ListModelsRequest(), metadata=auth, timeout=30)
    status = stub.SwarmStatus(api_pb2.SwarmStatusRequest(), metadata=auth, timeout=30)
    print(json.dumps({
        "text": "".join(chunk.text for chunk in chunks),
        "finish": chunks[-1].finish_reason,
        "model": models.models[0].id,
        "servable": models.models[0].servable,
        "nodes": len(status.nodes),
        "coverage": status.min_coverage,
    }))
    """
)


def test_a_client_built_from_the_proto_alone_generates_and_reads_the_swarm(swarm, tmp_path):
    (tmp_path / "api.proto").write_text(open("proto/api.proto").read())
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(tmp_path / "api.proto")],
        check=True,
    )
    script = tmp_path / "client.py"
    script.write_text(CLIENT_FROM_PROTO)
    # a fresh interpreter that never imports this repository's generated code
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), swarm.nodes[0].info["api_address"], TOKEN],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    with SwarmClient(swarm.initial_peers) as client:
        expected = client.chat(CHAT, max_new_tokens=12)
        assert result["model"] == client.model.model_id
    assert result["text"] == expected.text
    assert result["finish"] in ("stop", "length") and result["servable"]
    assert result["nodes"] == 2 and result["coverage"] == 1


def test_health_checks_and_reflection_answer_without_a_token(swarm):
    with grpc.insecure_channel(swarm.nodes[0].info["api_address"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "edgeswarm.v1.SwarmAPI"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {service.name for service in replies[0].list_services_response.service}
        assert {"edgeswarm.v1.SwarmAPI", "grpc.health.v1.Health"} <= names


def test_agent_tasks_through_the_api(api):
    submitted = api.SubmitAgentTask(
        pb.AgentTaskRequest(goal="What is 1234 * 5678?", tools=["calculator"], tool_choice="required"), metadata=AUTH, timeout=60
    )
    assert submitted.status == "running" and submitted.coordinator
    events = list(api.WatchTask(pb.WatchTaskRequest(task_id=submitted.task_id, after_seq=-1), metadata=AUTH, timeout=300))
    assert [event.seq for event in events] == list(range(len(events)))
    assert events[-1].type == "run.finished"
    assert any(event.type == "step.finished" and json.loads(event.event_json)["tool"] == "calculator" for event in events)
    status = api.GetTask(pb.TaskRef(task_id=submitted.task_id), metadata=AUTH, timeout=10)
    assert status.status == "succeeded" and "7006652" in status.answer.replace(",", "")
    assert rpc_error(api.GetTask, pb.TaskRef(task_id=submitted.task_id), metadata=TINY, timeout=10).code() == grpc.StatusCode.NOT_FOUND
    later = list(api.WatchTask(pb.WatchTaskRequest(task_id=submitted.task_id, after_seq=len(events) - 2), metadata=AUTH, timeout=30))
    assert [event.seq for event in later] == [len(events) - 1]


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (pb.TaskStatus, pb.SwarmStatusReply)):
            list(result)
    return caught.value


@pytest.mark.parametrize(
    "request_, code, message",
    [
        (pb.GenerateRequest(prompt="hi", model="no-such-model"), grpc.StatusCode.NOT_FOUND, "serves model"),
        (pb.GenerateRequest(prompt="hi", max_new_tokens=100000), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt or messages"),
        (pb.GenerateRequest(messages=[pb.ChatMessage(role="tool", content="x")]), grpc.StatusCode.INVALID_ARGUMENT, "roles"),
        (pb.GenerateRequest(prompt="x" * (2 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ],
)
def test_bad_generate_requests_get_clear_statuses(api, request_, code, message):
    error = rpc_error(api.Generate, request_, metadata=AUTH, timeout=30)
    assert error.code() == code and message in (error.details() or "")


def test_bad_task_requests_and_missing_tokens_are_refused(swarm, api):
    assert rpc_error(api.GetTask, pb.TaskRef(task_id="nope"), metadata=AUTH, timeout=10).code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(api.SubmitAgentTask, pb.AgentTaskRequest(goal=""), metadata=AUTH, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "goal" in error.details()
    for metadata in ([], [("authorization", "Bearer wrong")]):
        error = rpc_error(api.ListModels, pb.ListModelsRequest(), metadata=metadata, timeout=10)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert api.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10).models  # still serving


def test_garbage_bytes_to_every_method_are_invalid_argument(swarm, api):
    methods = pb.DESCRIPTOR.services_by_name["SwarmAPI"].methods
    with grpc.insecure_channel(swarm.nodes[0].info["api_address"]) as channel:
        for method in methods:
            call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(
                f"/edgeswarm.v1.SwarmAPI/{method.name}", request_serializer=None, response_deserializer=None
            )
            error = rpc_error(call, b"\xff\x00garbage", metadata=AUTH, timeout=10)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in error.details(), method.name
    assert len(methods) == 7 and api.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10).models  # still serving


def test_a_clients_token_budget_counts_generated_tokens_across_both_apis(swarm, api):
    import openai

    started = time.monotonic()
    request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=CHAT[0]["content"])], max_new_tokens=8)
    chunks = list(api.Generate(request, metadata=TINY, timeout=120))  # a full budget admits it
    generated = len(chunks) - 1
    assert generated >= 1
    error = rpc_error(api.Generate, request, metadata=TINY, timeout=30)
    elapsed = time.monotonic() - started
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "'tiny' has used its budget" in error.details()
    retry_after = int(dict(error.trailing_metadata())[RETRY_AFTER_METADATA])
    assert 60 * generated - elapsed - 1 <= retry_after <= 60 * generated  # one token a minute, `generated` in debt
    model = api.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10).models[0].id
    http = openai.OpenAI(base_url=f"http://{swarm.nodes[0].info['http_address']}/v1", api_key=TINY_TOKEN, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:  # the HTTP API charges the same budget
        http.chat.completions.create(model=model, messages=CHAT, max_tokens=8)
    assert refused.value.response.json()["error"]["type"] == "tokens" and int(refused.value.response.headers["Retry-After"]) >= 1
    assert len(list(api.Generate(request, metadata=AUTH, timeout=120))) > 1  # the other client is served


def test_each_client_is_rate_limited(swarm):
    with grpc.insecure_channel(swarm.nodes[1].info["api_address"]) as channel:
        api = pb_grpc.SwarmAPIStub(channel)
        codes = []
        for _ in range(6):
            try:
                api.ListModels(pb.ListModelsRequest(), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
        assert codes[0] == grpc.StatusCode.OK and grpc.StatusCode.RESOURCE_EXHAUSTED in codes


def test_the_node_serves_the_openai_compatible_api_too(swarm):
    import openai

    client = openai.OpenAI(base_url=f"http://{swarm.nodes[0].info['http_address']}/v1", api_key=TOKEN)
    [model] = client.models.list().data
    reply = client.chat.completions.create(model=model.id, messages=CHAT, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong").models.list()
