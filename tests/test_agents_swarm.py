"""Agent runs on a real 3-node swarm of SmolLM2-135M-Instruct: tools, memory, placement, and node deaths.

Every node serves all 30 blocks, so that the run survives the two node deaths these tests cause (the
model pipeline itself is tested with split spans in test_swarm_smollm). The last two tests kill nodes, so
they come last; each sets up what it needs itself. The slow tools wait at a gate that the test opens, so
that "mid-step" means mid-step however slowly the machine runs.
"""

import itertools
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from edgeswarm import SwarmClient
from edgeswarm.agent.client import AgentRunError
from edgeswarm.agent.memory_placement import replica_nodes
from devtools.launcher import LocalSwarm
from tests.support import node_info, swarm_member, wait_until

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 240

# custom tools: capital_of only on node 1; slow_lookup on nodes 1 and 2; slow_double only on node 0
CAPITALS = '''
@tool()
def capital_of(country: str) -> str:
    """Return the capital city of a country.

    Args:
        country: The country's name in English.
    """
    return {"france": "Paris", "japan": "Tokyo", "kenya": "Nairobi", "peru": "Lima"}.get(country.strip().lower(), "unknown")
'''
SLOW_LOOKUP = '''
@tool(timeout=GATE_SECONDS + 30)
def slow_lookup(key: str) -> str:
    """Look up the secret code stored under a key (slow).

    Args:
        key: The key to look up.
    """
    wait_at_gate(f"lookup-{key.strip().lower()}")
    return f"code-{key.strip().lower()}-7"
'''
SLOW_DOUBLE = '''
@tool(timeout=GATE_SECONDS + 30)
def slow_double(number: int) -> int:
    """Double a number, slowly.

    Args:
        number: The number to double.
    """
    wait_at_gate("double")
    return 2 * number
'''
# the slow tools run until the test opens their gate (a file in GATES), or GATE_SECONDS have passed
GATE_SECONDS = 200
TOOLS_HEADER = '''
import os
import time

from edgeswarm.agent.tools import tool

GATES, GATE_SECONDS = {gates!r}, {seconds!r}


def wait_at_gate(name: str) -> None:
    waited = 0.0
    while not os.path.exists(os.path.join(GATES, name)) and waited < GATE_SECONDS:
        time.sleep(0.1)
        waited += 0.1
'''


def tools_file(tmp_path_factory, gates, name: str, *bodies: str) -> str:
    path = tmp_path_factory.mktemp("tools") / f"{name}.py"
    header = TOOLS_HEADER.format(gates=str(gates), seconds=GATE_SECONDS)
    path.write_text(header + "".join(textwrap.dedent(body) for body in bodies))
    return str(path)


@pytest.fixture(scope="module")
def gates(tmp_path_factory):
    return tmp_path_factory.mktemp("gates")


def open_gate(gates, name: str) -> None:
    (gates / name).touch()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, gates):
    tools = [
        tools_file(tmp_path_factory, gates, "node0", SLOW_DOUBLE),
        tools_file(tmp_path_factory, gates, "node1", CAPITALS, SLOW_LOOKUP),
        tools_file(tmp_path_factory, gates, "node2", SLOW_LOOKUP),
    ]
    arguments = [
        ["--blocks", "0:30", "--tools", tools[index], "--data-dir", str(tmp_path_factory.mktemp(f"node{index}"))]
        for index in range(3)
    ]
    with LocalSwarm(arguments) as local_swarm, swarm_member(local_swarm.initial_peers):
        yield local_swarm


@pytest.fixture(scope="module")
def client(swarm):
    with SwarmClient(swarm.initial_peers) as swarm_client:
        wait_until(lambda: len(swarm_client.agents.directory()) == 3, "every node announced its task capabilities", interval=0.5)
        yield swarm_client


def node_id(swarm, index: int) -> str:
    return swarm.nodes[index].info["node_id"]


@pytest.fixture(scope="module")
def lab_notes(swarm, client) -> str:
    """A namespace of the client's that nodes 1 and 2 hold (by rendezvous placement over the 3 nodes), so
    that the node a later test kills, which is one of those two, surely holds it."""
    nodes = [node_id(swarm, index) for index in range(3)]
    for index in itertools.count():
        name = f"lab-notes-{index}"
        if set(replica_nodes(storage_of(client, name), nodes)) == set(nodes[1:]):
            return name


def storage_of(client, namespace: str) -> str:
    return client.agents.scheduler.storage_id(client.identity.fingerprint, namespace)


def finished_steps(events, step_id=None, tool=None):
    return [
        event
        for event in events
        if event["type"] == "step.finished" and step_id in (None, event["step_id"]) and tool in (None, event["tool"])
    ]


def digits(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d)", "", text)


def test_a_task_that_needs_the_calculator_gets_the_right_number(swarm, client):
    task = client.submit_agent_task("What is 1234 * 5678?", tools=["calculator"], tool_choice="required")
    answer = task.result(timeout=RUN_TIMEOUT)
    events = list(task.events())
    [calculation] = finished_steps(events, tool="calculator")
    assert calculation["ok"] and calculation["value"] == 7006652
    assert "7006652" in digits(answer)
    thinking = finished_steps(events, step_id="think1") + finished_steps(events, step_id="think2")
    assert len(thinking) == 2
    # the second llm call ran where the first left its KV prefix, and fed only the new text
    assert thinking[1]["node"] == thinking[0]["node"]
    assert 0 < thinking[0]["value"]["prompt_tokens"] <= thinking[1]["value"]["reused_tokens"]
    assert any(event["type"] == "token" for event in events)
    # once the run has ended, its llm session is closed: no node keeps its KV caches
    wait_until(lambda: [node_info(node).active_sessions for node in swarm.nodes] == [0, 0, 0], "no node has a session open", timeout=30)


def test_a_fact_written_to_memory_is_found_and_used(swarm, client, lab_notes):
    holders = client.remember(lab_notes, "The wifi password of the lab is orchid-42.", record_id="wifi")
    assert sorted(holders) == sorted([node_id(swarm, 1), node_id(swarm, 2)])  # replicated on two nodes
    task = client.submit_agent_task("What is the wifi password of the lab?", tools=[], memory_namespace=lab_notes)
    answer = task.result(timeout=RUN_TIMEOUT)
    events = list(task.events())
    [read] = finished_steps(events, step_id="memory.read")
    assert read["node"] in holders and "orchid-42" in read["value"]["hits"][0]["text"]
    assert "orchid-42" in answer, [e for e in events if e["type"] != "token"]
    # the answer was remembered too, on two nodes
    [written] = finished_steps(events, step_id="memory.write")
    assert written["ok"] and len(written["value"]["replicas"]) == 2


def test_tool_steps_run_on_the_node_that_hosts_the_tool(swarm, client):
    task = client.submit_agent_task("What is the capital of Kenya?", tools=["capital_of"], tool_choice="required")
    task.result(timeout=RUN_TIMEOUT)
    events = list(task.events())
    started = [event for event in events if event["type"] == "step.started" and event["tool"] == "capital_of"]
    assert started and all(event["node"] == node_id(swarm, 1) for event in started)
    [lookup] = finished_steps(events, tool="capital_of")
    assert lookup["ok"] and lookup["value"] == "Nairobi" and lookup["node"] == node_id(swarm, 1)


def test_invalid_tool_arguments_become_an_error_step_and_the_plan_goes_on(client):
    plan = [
        {"name": "calculator", "arguments": {"expr": 2}},  # wrong argument name and type
        {"name": "calculator", "arguments": {"expression": "2 + 3"}},
        {"name": "calculator", "arguments": {"expression": "$2 * 10"}},  # uses call 2's result
    ]
    task = client.submit_agent_task("Compute 2 + 3, then ten times that.", tools=["calculator"], strategy="plan", plan=plan)
    task.result(timeout=RUN_TIMEOUT)
    events = list(task.events())
    [planned] = [event for event in events if event["type"] == "plan"]
    assert [call["depends_on"] for call in planned["calls"]] == [[], [], [2]]
    [bad] = finished_steps(events, step_id="plan.call1")
    assert not bad["ok"] and "expression" in bad["error"]
    assert finished_steps(events, step_id="plan.call2")[0]["value"] == 5
    assert finished_steps(events, step_id="plan.call3")[0]["value"] == 50


def test_bad_run_requests_are_refused_clearly(client):
    with pytest.raises(ValueError, match="no node of the swarm hosts the tools"):
        client.submit_agent_task("hi", tools=["no_such_tool"])
    with pytest.raises(ValueError, match="max_steps"):
        client.submit_agent_task("hi", max_steps=0)


def test_a_team_run_spreads_its_workers_over_other_nodes(swarm, client):
    task = client.submit_agent_task(
        "What is 12 * 12, and what is 7 + 8?", tools=["calculator"], strategy="team", coordinator=node_id(swarm, 0)
    )
    answer = task.result(timeout=RUN_TIMEOUT)
    events = list(task.events())
    assigned = [event for event in events if event["type"] == "message" and event["from"] == "planner"]
    reported = [event for event in events if event["type"] == "message" and event["to"] == "critic"]
    assert assigned and len(reported) == len(assigned)
    workers = finished_steps(events, tool=None)
    sub_runs = [event for event in workers if event["kind"] == "subagent"]
    assert len(sub_runs) == len(assigned) and all(event["ok"] for event in sub_runs)
    # sub-agents are coordinated away from the parent's node, and their own steps show up in its events
    assert all(event["node"] != node_id(swarm, 0) for event in sub_runs)
    assert any(event["type"] == "subagent" for event in events)
    assert answer and events[-1]["type"] == "run.finished"


def test_the_agent_command_prints_steps_and_the_answer(swarm):
    command = [sys.executable, "-m", "edgeswarm.node.cli", "agent", "What is 6 * 7?", "--tools", "calculator", "--tool-choice", "required"]
    done = subprocess.run([*command, "--initial-peers", *swarm.initial_peers], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"act1\.call1 +calculator done on \w+ in [\d.]+s: 42", done.stdout), done.stdout
    assert "answer:" in done.stdout


def wait_for(task, predicate, timeout=RUN_TIMEOUT):
    for event in task.events(timeout=timeout):
        if predicate(event):
            return event
    raise AssertionError("the run ended before the awaited event")


def test_a_cancelled_run_stops_at_once_and_says_so(swarm, client, gates):
    task = client.submit_agent_task(
        "What is the secret code for key beta?", tools=["slow_lookup"], tool_choice="required", coordinator=node_id(swarm, 0)
    )
    try:
        wait_for(task, lambda event: event["type"] == "step.started" and event["tool"] == "slow_lookup")
        task.cancel()
        with pytest.raises(AgentRunError, match="cancelled"):
            task.result(timeout=RUN_TIMEOUT)  # the tool step is still running: its gate is closed
    finally:
        open_gate(gates, "lookup-beta")
    events = list(task.events())
    assert not any(event["ok"] for event in finished_steps(events, tool="slow_lookup"))  # it was not waited for
    assert not any(event["type"] == "answer" for event in events)


def test_a_run_completes_when_a_worker_node_dies_mid_step(swarm, client, lab_notes, gates):
    client.remember(lab_notes, "The wifi password of the lab is orchid-42.", record_id="wifi")  # on nodes 1 and 2
    task = client.submit_agent_task(
        "What is the secret code for key alpha?", tools=["slow_lookup"], tool_choice="required", coordinator=node_id(swarm, 0)
    )
    try:
        started = wait_for(task, lambda event: event["type"] == "step.started" and event["tool"] == "slow_lookup")
        victim = next(index for index in (1, 2) if node_id(swarm, index) == started["node"])
        swarm.nodes[victim].stop(signal.SIGKILL)  # while its step waits at the closed gate
    finally:
        open_gate(gates, "lookup-alpha")
    answer = task.result(timeout=RUN_TIMEOUT)
    events = list(task.events())
    assert any(event["type"] == "step.retry" and event["node"] == started["node"] for event in events)
    [lookup] = finished_steps(events, tool="slow_lookup")
    assert lookup["ok"] and lookup["value"] == "code-alpha-7" and lookup["node"] == node_id(swarm, 3 - victim)
    assert answer
    # the memory written above is on two nodes, so it outlives any one of them: here one that held it
    assert started["node"] in replica_nodes(storage_of(client, lab_notes), [node_id(swarm, index) for index in range(3)])
    assert any("orchid-42" in hit["text"] for hit in client.recall(lab_notes, "wifi password"))


def test_a_run_resumes_from_its_journal_when_its_coordinator_dies(swarm, client, gates):
    alive = [index for index in (1, 2) if swarm.nodes[index].process.poll() is None]
    coordinator = alive[0]
    for bystander in alive[1:]:  # node 0 is the only other node left to take the run over
        swarm.nodes[bystander].stop(signal.SIGKILL)
    task = client.submit_agent_task(
        "Double the number 21.", tools=["slow_double"], tool_choice="required", coordinator=node_id(swarm, coordinator)
    )
    try:
        wait_for(task, lambda event: event["type"] == "step.started" and event["tool"] == "slow_double")
        swarm.nodes[coordinator].stop(signal.SIGKILL)  # while the step waits at the closed gate
    finally:
        open_gate(gates, "double")
    task.result(timeout=RUN_TIMEOUT)
    events = list(task.events())
    resumed_at = next(index for index, event in enumerate(events) if event["type"] == "run.resumed")
    assert events[resumed_at]["node"] == node_id(swarm, 0) and task.coordinator == node_id(swarm, 0)
    after = events[resumed_at:]
    # think1 succeeded before the crash: it is taken from the journal, not run again
    assert any(event["type"] == "step.reused" and event["step_id"] == "think1" for event in after)
    assert not any(event["type"] == "step.started" and event["step_id"] == "think1" for event in after)
    [double] = [event for event in finished_steps(after, tool="slow_double") if event["ok"]]
    assert double["value"] == 42
