"""The agent runtime without a model: plans as DAGs, run specs, step retries over real gRPC, journal replay."""

import threading
from concurrent import futures

import grpc
import pytest

from edgeswarm.agent.capabilities import TaskCapabilities
from edgeswarm.agent.coordinator import RunCoordinator, _JournaledRun
from edgeswarm.agent.dag import PlanError, execute_plan, parse_plan, substitute
from edgeswarm.agent.journal import Journal
from edgeswarm.agent.runtime import RunSpec
from edgeswarm.agent.scheduler import StepScheduler
from edgeswarm.agent.steps import Step, StepOutcome
from edgeswarm.node.task_service import TaskServicer, add_task_service
from tests.support import GatedWorker

TOOL = {"description": "a tool", "parameters": {"type": "object", "properties": {}}, "idempotent": True}


# --- plans -------------------------------------------------------------------------------------------


def test_a_plan_finds_its_dependencies_and_refuses_forward_references():
    plan = parse_plan([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": "$1"}}, {"tool": "c", "arguments": {"y": "$1 and $2"}}])
    assert [call.depends_on for call in plan] == [(), (1,), (1, 2)]
    with pytest.raises(PlanError, match=r"uses \$2"):
        parse_plan([{"name": "a", "arguments": {"x": "$2"}}, {"name": "b", "arguments": {}}])
    with pytest.raises(PlanError):
        parse_plan([])


def test_placeholders_take_the_value_or_its_text():
    results = {1: 5, 2: {"k": 1}}
    assert substitute({"a": "$1", "b": "x $1 y", "c": ["$2"], "d": 3}, results) == {"a": 5, "b": "x 5 y", "c": [{"k": 1}], "d": 3}


def test_independent_calls_run_in_parallel_and_failures_stop_their_dependents():
    barrier = threading.Barrier(2, timeout=10)
    ran = []

    def run_call(call, arguments):
        ran.append(call.index)
        if call.name == "meet":
            barrier.wait()  # passes only if both "meet" calls run at the same time
            return StepOutcome(ok=True, value=call.index)
        if call.name == "fail":
            return StepOutcome(ok=False, error="boom")
        return StepOutcome(ok=True, value=arguments)

    plan = parse_plan(
        [
            {"name": "meet", "arguments": {}},
            {"name": "meet", "arguments": {}},
            {"name": "fail", "arguments": {}},
            {"name": "use", "arguments": {"x": "$3"}},
            {"name": "use", "arguments": {"x": "$1", "y": "$2"}},
        ]
    )
    outcomes = execute_plan(plan, run_call)
    assert outcomes[1].ok and outcomes[2].ok
    assert not outcomes[4].ok and "failed call 3" in outcomes[4].error and 4 not in ran
    assert outcomes[5].value == {"x": 1, "y": 2}


def test_run_specs_are_checked():
    assert RunSpec.from_dict(RunSpec("hi", tools=["calculator"]).to_dict()) == RunSpec("hi", tools=["calculator"])
    for bad, message in [
        ({"goal": ""}, "goal"),
        ({"goal": "x", "strategy": "magic"}, "strategy"),
        ({"goal": "x", "memory_namespace": "bad space"}, "namespace"),
        ({"goal": "x", "tool_choice": "always"}, "tool_choice"),
        ({"goal": "x", "surprise": 1}, "unknown run spec fields"),
        ({"goal": "x", "plan": [{"name": "a", "arguments": {"x": "$1"}}]}, r"\$1"),
    ]:
        with pytest.raises(ValueError, match=message):
            RunSpec.from_dict(bad)


# --- retries over real gRPC ------------------------------------------------------------------------


@pytest.fixture
def two_nodes():
    nodes = []
    for node_id in ("node-a", "node-b"):
        worker = GatedWorker(node_id)
        server = grpc.server(futures.ThreadPoolExecutor(8))
        add_task_service(server, TaskServicer(worker, coordinator=None))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        nodes.append((worker, server, TaskCapabilities(node_id, f"127.0.0.1:{port}", tools={"t": TOOL})))
    yield nodes
    for worker, server, _ in nodes:
        worker.release.set()
        server.stop(0)


@pytest.mark.parametrize("idempotent", [True, False])
def test_a_node_dying_mid_step_means_a_retry_elsewhere_only_for_idempotent_steps(two_nodes, idempotent):
    (worker_a, server_a, _), (worker_b, _, _) = two_nodes
    worker_b.release.set()
    scheduler = StepScheduler(lambda: [capabilities for _, _, capabilities in two_nodes], connect_timeout=2)
    failures = []
    result = {}
    step = Step("s1", "tool", {"name": "t", "arguments": {}}, idempotent=idempotent)
    thread = threading.Thread(target=lambda: result.update(outcome=scheduler.run("run", step, on_failure=lambda *a: failures.append(a))))
    thread.start()
    assert worker_a.entered.wait(10)  # node a accepted and started the step...
    server_a.stop(0)  # ...and dies
    thread.join(30)
    outcome = result["outcome"]
    assert failures and failures[0][0] == "node-a"
    if idempotent:
        assert outcome.ok and outcome.value == {"ran_on": "node-b"} and outcome.tried == ["node-a", "node-b"]
    else:
        assert not outcome.ok and "not run again" in outcome.error
        assert worker_b.started == 0
    scheduler.close()


def test_runs_go_to_the_least_loaded_coordinator_and_a_sub_agent_to_another_one_first():
    nodes = [
        TaskCapabilities("busy", "127.0.0.1:1", running_steps=3),
        TaskCapabilities("idle", "127.0.0.1:2"),
        TaskCapabilities("half", "127.0.0.1:3", free_cpu=0.5),
        TaskCapabilities("steps-only", "127.0.0.1:4", coordinator=False),
    ]
    scheduler = StepScheduler(lambda: nodes)

    def placed(**options) -> list[str]:
        return [node.node_id for node in scheduler.place_run(**options)]

    assert placed() == ["idle", "half", "busy"]  # a client's run
    assert placed(asking="idle") == ["half", "busy", "idle"]  # a sub-agent of a run coordinated on "idle"
    assert placed(exclude={"half", "busy"}, asking="idle") == ["idle"]  # no other coordinator left: itself
    assert placed(exclude={"idle", "half"}) == ["busy"]  # a backup of "idle"'s run, whose backup "half" died
    scheduler.ban("idle")
    assert placed() == ["half", "busy"]
    scheduler.close()


def test_bad_step_requests_get_invalid_argument(two_nodes):
    from edgeswarm.proto import tasks_pb2 as pb
    from edgeswarm.proto import tasks_pb2_grpc as pb_grpc

    address = two_nodes[0][2].address
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        for request, message in [
            (pb.StepRequest(run_id="r", step_id="s", kind="rm -rf", args_json="{}"), "unknown step kind"),
            (pb.StepRequest(run_id="r", step_id="s", kind="tool", args_json="{not json"), "not JSON"),
            (pb.StepRequest(run_id="r", step_id="s", kind="tool", args_json="[1]"), "JSON object"),
            (pb.StepRequest(run_id="", step_id="s", kind="tool", args_json="{}"), "run_id"),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.RunStep(request, timeout=10))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()


# --- replay from the journal ---------------------------------------------------------------------------


class RecordingScheduler:
    """Stands in for the scheduler: runs nothing, records what it was asked to run."""

    max_attempts = 3

    def __init__(self):
        self.ran = []

    def run(self, run_id, step, first_attempt=0, on_text=None, on_dispatch=None, on_failure=None):
        self.ran.append(step.step_id)
        if on_dispatch:
            on_dispatch("node-x", first_attempt)
        return StepOutcome(ok=True, value="fresh", node_id="node-x")

    def nodes(self):
        return []

    def cancel_run(self, run_id):
        pass


def test_a_resumed_run_reuses_journaled_steps_and_never_reruns_a_non_idempotent_one(tmp_path):
    journal = Journal(str(tmp_path / "journal.sqlite"))
    journal.create_run("run1", "goal", RunSpec("goal").to_dict())
    journal.record_step_started("run1", "done", "tool", "node-y", 0)
    journal.record_step_finished("run1", "done", 0, True, result=StepOutcome(True, "old", node_id="node-y").to_dict())
    journal.record_step_started("run1", "inflight_unsafe", "tool", "node-y", 0)
    journal.record_step_started("run1", "inflight_safe", "tool", "node-y", 0)
    scheduler = RecordingScheduler()
    coordinator = RunCoordinator("me", "127.0.0.1:1", journal, scheduler, tool_catalog=dict, watch_period=60)
    run = _JournaledRun(coordinator, "run1", RunSpec("goal"))
    tool = {"name": "t", "arguments": {}}
    assert run.step(Step("done", "tool", tool)).value == "old"
    unsafe = run.step(Step("inflight_unsafe", "tool", tool, idempotent=False))
    assert not unsafe.ok and "not run again" in unsafe.error
    assert run.step(Step("inflight_safe", "tool", tool)).value == "fresh"
    assert scheduler.ran == ["inflight_safe"]
    kinds = [event["type"] for _, event in journal.events("run1")]
    assert kinds.count("step.reused") == 1
    coordinator.close()


# --- strategies over a scripted context ------------------------------------------------------------------


class ScriptedContext:
    """A RunContext whose llm steps return scripted decisions and whose tool steps echo their arguments."""

    def __init__(self, spec, decisions):
        self.spec, self.run_id = spec, "scripted"
        self.decisions = list(decisions)
        self.steps, self.events = [], []

    def step(self, step):
        self.steps.append(step)
        if step.kind == "llm":
            return StepOutcome(ok=True, value=self.decisions.pop(0), node_id="llm-node")
        return StepOutcome(ok=True, value=step.args.get("arguments"), node_id="tool-node")

    def emit(self, event):
        self.events.append(event)

    def tool_schemas(self):
        return [{"type": "function", "function": {"name": "echo", "description": "echo", "parameters": {"type": "object", "properties": {}}}}]

    def tool_is_idempotent(self, name):
        return True


def decision(*calls, answer=None):
    return {"calls": [{"name": "echo", "arguments": arguments} for arguments in calls], "answer": answer, "text": "t"}


def test_react_acts_in_parallel_keeps_its_llm_node_and_stops_a_loop():
    from edgeswarm.agent.runtime import run_agent

    repeated = decision({"x": 1})
    context = ScriptedContext(RunSpec("goal", max_steps=5), [decision({"x": 1}, {"x": 2}), repeated, repeated, decision(answer="done")])
    assert run_agent(context)["answer"] == "done"
    kinds = [(step.step_id, step.kind) for step in context.steps]
    assert kinds == [
        ("think1", "llm"), ("act1.call1", "tool"), ("act1.call2", "tool"),
        ("think2", "llm"), ("act2.call1", "tool"),
        ("think3", "llm"), ("act3.call1", "tool"),  # the same call again: it must answer now
        ("answer", "llm"),
    ]
    llm_steps = [step for step in context.steps if step.kind == "llm"]
    assert llm_steps[0].prefer_node is None and all(step.prefer_node == "llm-node" for step in llm_steps[1:])
    assert llm_steps[-1].args["answer_only"] and "Tool results" in llm_steps[-1].args["messages"][-1]["content"]
