"""The route manager's bans, and "busy" as a gRPC status detail: a full node is skipped for as long as it
asks, by the inference client and the agent scheduler alike, which share one Banlist."""

import threading
from concurrent import futures

import grpc
import pytest

from edgeswarm.agent.capabilities import TaskCapabilities
from edgeswarm.agent.scheduler import StepScheduler
from edgeswarm.agent.steps import Step
from edgeswarm.node.admission import TASKS, AdmissionInterceptor, CallSlots
from edgeswarm.node.task_service import TaskServicer, add_task_service
from edgeswarm.protocol.busy import BUSY_RETRY_SECONDS, busy_retry_after
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.swarm.errors import NodeBusyError, NodeUnavailableError
from edgeswarm.swarm.routes import Banlist, RouteManager
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.transport import remote_error
from tests.support import GatedWorker

TOOL = {"description": "a tool", "parameters": {"type": "object", "properties": {}}, "idempotent": True}
LONG_BAN = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_ban_lasts_its_time_and_a_shorter_one_never_shortens_it():
    clock = Clock()
    bans = Banlist(clock)
    bans.ban("liar", LONG_BAN)
    bans.ban("liar", 5)  # a later failure of the same node must not lift the longer ban
    bans.ban("slow", 5)
    assert bans.banned() == {"liar", "slow"}
    clock.now += 6
    assert bans.banned() == {"liar"} and bans.is_banned("liar") and not bans.is_banned("slow")


def test_a_busy_node_is_skipped_for_as_long_as_it_asks_and_a_failed_one_for_the_ban():
    clock = Clock()
    routes = RouteManager(dht=None, model_id="m", num_blocks=4, identity=None, banlist=Banlist(clock), ban_seconds=60, busy_seconds=2)
    routes.report_failure(NodeBusyError("full", "busy-node", retry_after=10))
    routes.report_failure(NodeBusyError("full", "brief-node", retry_after=0.5))  # at least busy_seconds
    routes.report_failure(NodeUnavailableError("dead", "dead-node"))
    routes.report_failure(NodeUnavailableError("no node named"))  # nothing to ban
    assert routes.banlist.banned() == {"busy-node", "brief-node", "dead-node"}
    clock.now += 3
    assert routes.banlist.banned() == {"busy-node", "dead-node"}
    clock.now += 8
    assert routes.banlist.banned() == {"dead-node"}


@pytest.fixture
def full_and_free_nodes():
    """node-a-full has one task slot (held by a step that waits); node-b-free has room."""
    nodes = []
    for node_id, slots in (("node-a-full", 1), ("node-b-free", 8)):
        worker = GatedWorker(node_id)
        server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=[AdmissionInterceptor({TASKS: CallSlots("tasks", slots)})])
        add_task_service(server, TaskServicer(worker, coordinator=None))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        nodes.append((worker, server, TaskCapabilities(node_id, f"127.0.0.1:{port}", tools={"t": TOOL})))
    yield nodes
    for worker, server, _ in nodes:
        worker.release.set()
        server.stop(0)


def test_a_full_node_refuses_busy_in_the_status_details_and_work_goes_elsewhere(full_and_free_nodes):
    (full_worker, _, full), (free_worker, _, free) = full_and_free_nodes
    free_worker.release.set()
    clock = Clock()
    bans = Banlist(clock)
    only_full = StepScheduler(lambda: [full], connect_timeout=10)
    holder = threading.Thread(target=lambda: only_full.run("hold", Step("hold", "tool", {"name": "t", "arguments": {}})))
    holder.start()
    assert full_worker.entered.wait(30)  # node-a-full's one slot is taken

    channel = grpc.insecure_channel(full.address)
    with pytest.raises(grpc.RpcError) as refused:
        for _ in channel.unary_stream("/edgeswarm.v1.TaskService/RunStep")(b"", timeout=30):
            pass
    channel.close()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert busy_retry_after(refused.value) == BUSY_RETRY_SECONDS
    assert not refused.value.details().startswith("busy")  # the words carry no protocol
    record = ServerRecord(node_id="node-a-full", address=full.address, model_id="m", start_block=0, end_block=1, throughput=1.0, kv_free_bytes=0)
    assert isinstance(remote_error(Hop(record, 0, 1), refused.value), NodeBusyError)

    scheduler = StepScheduler(lambda: [full, free], connect_timeout=10, banlist=bans)
    step = Step("s", "tool", {"name": "t", "arguments": {}}, idempotent=False)  # refused before it was accepted: safe to resend
    outcome = scheduler.run("run", step)
    assert outcome.ok and outcome.value == {"ran_on": "node-b-free"}
    assert bans.banned() == {"node-a-full"}  # skipped by everyone sharing the banlist...
    clock.now += BUSY_RETRY_SECONDS + 1
    assert bans.banned() == set()  # ...for the time it asked, not a failed node's ban
    full_worker.release.set()
    holder.join(30)
    only_full.close()
    scheduler.close()
