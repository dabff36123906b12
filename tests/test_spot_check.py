"""Spot checks catch a node that returns wrong hidden states, and never flag honest ones; routing does
not believe a node's word about its speed.

The judging rule, the difference measure and the codecs' error bounds are tested directly; the rest runs
a real swarm of the tiny model: two honest nodes and one that corrupts its outputs (a lying node,
devtools.lying_node), all serving every block, so each can verify the others. Some tests add a fourth
node that lies in another way.
"""

import threading

import pytest
import torch

from edgeswarm import SwarmClient
from devtools.launcher import LocalSwarm, start_node
from devtools.lying_node import Lies, parse_args
from devtools.reference import reference_greedy_tokens
from edgeswarm.protocol.codecs import decode_tensor, encode_tensor
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.swarm.routing import UNMEASURED_CEILING_FACTOR, Hop
from devtools.decoding import greedy_decode
from edgeswarm.swarm.policy import DEFAULT_SPOT_CHECK, SessionPolicy
from edgeswarm.swarm.session import InferenceSession
from edgeswarm.swarm.spot_check import codec_error_bound, difference, judge
from tests.support import until_eos, wait_until

PROMPT = [5, 77, 300, 12, 9, 401]
TOKENS = 16
NOISE = 0.05
FAULT = Lies(corrupt_outputs=NOISE)
POLICY = SessionPolicy(spot_check=1.0, spot_check_seed=0, replacement_wait=20, min_step_deadline=5.0)
# lies only on replies asked for in a codec: the steps that looked unchecked when checked ones asked for raw replies
SLY_FAULT = Lies(corrupt_outputs=NOISE, when="compressed_reply")
BRAGGING_THROUGHPUT = 1e6
BRAGGING = Lies(announce_throughput=BRAGGING_THROUGHPUT)
LOSSY_CODECS = ("fp16", "bf16", "int8_outlier", "int8_block", "int8_token", "int4_block")


# --- the measure and the rule, without a swarm ------------------------------------------------------


def noisy(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    return tensor + scale * tensor.pow(2).mean(-1, keepdim=True).sqrt() * torch.randn_like(tensor)


def test_difference_is_relative_per_position_and_ignores_padding():
    torch.manual_seed(0)
    a = torch.randn(2, 5, 64) * torch.tensor([1.0, 1000.0])[:, None, None]  # rows of very different scale
    assert difference(a, a.clone()) == 0.0
    assert 0.04 < difference(a, noisy(a, NOISE)) < 0.08
    b = a.clone()
    b[0, 0] = 1e6  # garbage at a padding position
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    assert difference(a, b, mask) == 0.0 and difference(a, b) > 0.5
    b[1, 2, 3] = float("nan")
    assert difference(a, b, mask) == float("inf")
    assert difference(a, a[:, :4]) == float("inf")


def record(name: str) -> ServerRecord:
    return ServerRecord(name, f"{name}:1", "m", 0, 6, 100.0, 0)


def test_the_judging_rule():
    torch.manual_seed(0)
    truth, mask, tolerance = torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.bool), 1e-3
    hop, verifier, referee = record("hop"), record("verifier"), record("referee")
    honest = lambda record: truth + 1e-7 * torch.randn_like(truth)  # noqa: E731
    liar = lambda record: noisy(truth, NOISE)  # noqa: E731
    lie = noisy(truth, NOISE)

    def asking(liars):
        return lambda record: liar(record) if record.node_id in liars else honest(record)

    # a referee that agrees with the verifier outvotes the hop, and the other way round
    verdict = judge(hop, lie, verifier, truth, [referee], asking({"hop"}), mask, tolerance)
    assert list(verdict.liars) == ["hop"] and verdict.liars["hop"][1].startswith("outvoted")
    verdict = judge(hop, truth, verifier, lie, [referee], asking({"verifier"}), mask, tolerance)
    assert list(verdict.liars) == ["verifier"]
    # no referee: each side is asked again, and a node that contradicts itself is the liar
    verdict = judge(hop, lie, verifier, truth, [], asking({"hop"}), mask, tolerance)
    assert list(verdict.liars) == ["hop"] and verdict.liars["hop"][1].startswith("inconsistent")
    verdict = judge(hop, truth, verifier, lie, [], asking({"verifier"}), mask, tolerance)
    assert list(verdict.liars) == ["verifier"]
    # a referee that agrees with neither side settles nothing: self-consistency decides
    verdict = judge(hop, lie, verifier, truth, [referee], asking({"hop", "referee"}), mask, tolerance)
    assert list(verdict.liars) == ["hop"] and verdict.liars["hop"][1].startswith("inconsistent")
    # two self-consistent nodes that disagree, and nobody else: nobody is banned
    wrong = truth + 1.0
    consistent = lambda record: wrong if record.node_id == "hop" else truth  # noqa: E731
    assert judge(hop, wrong, verifier, truth, [], consistent, mask, tolerance).liars == {}
    # a node that cannot answer again is not convicted
    assert judge(hop, lie, verifier, truth, [], lambda record: None, mask, tolerance).liars == {}


def test_codec_error_bounds_hold_and_are_nearly_reached(tiny_llama_reference):
    # real hidden states (the tiny model's, at every block boundary) and SmolLM2-like ones with huge channels
    with torch.no_grad():
        states = list(tiny_llama_reference(torch.tensor([PROMPT * 8]), output_hidden_states=True).hidden_states[1:-1])
    torch.manual_seed(0)
    massive = torch.randn(1, 32, 576)
    massive[..., :2] *= 50.0
    states.append(massive)
    for codec in LOSSY_CODECS:
        for state in states:
            error = difference(decode_tensor(encode_tensor(state, codec)), state)
            assert error <= codec_error_bound(codec, state.shape[-1]), codec
    # the int8 codecs err by more than float32 nodes may differ: without the bound an honest reply is a lie
    assert difference(decode_tensor(encode_tensor(massive, "int8_block")), massive) > POLICY.spot_check_tolerance
    # the worst case: a block of one large value and the rest halfway between two steps
    for codec, levels, block in (("int8_block", 127, 64), ("int8_token", 127, 64), ("int4_block", 7, 32)):
        step = 2.0**-3  # the block's scale, exact in float16
        worst = torch.full((1, 1, block), step / 2)
        worst[..., 0] = levels * step
        error = difference(decode_tensor(encode_tensor(worst, codec)), worst)
        assert 0.9 * codec_error_bound(codec, block) < error <= codec_error_bound(codec, block), codec
    assert codec_error_bound("", 64) == codec_error_bound("lossless", 64) == 0.0


def lies_of(*options: str) -> Lies:
    """The lies a lying node's command line asks for (devtools.lying_node)."""
    lies, node_args = parse_args([*options, "join", "--blocks", "0:6"])
    assert node_args == ["join", "--blocks", "0:6"]  # the rest goes to swarm-node untouched
    return lies


def test_lying_node_options():
    assert lies_of() == Lies()
    assert lies_of("--corrupt-outputs", "0.05") == Lies(corrupt_outputs=0.05)
    sly = lies_of("--corrupt-outputs", "0.05", "--when", "compressed_reply")
    assert sly.corrupts("int8_block") and not sly.corrupts("") and not sly.corrupts("none")
    assert lies_of("--corrupt-outputs", "0.05").corrupts("")
    assert lies_of("--announce-throughput", "1e6").announce_throughput == 1e6
    assert all(lies_of(*lies.to_args()) == lies for lies in (FAULT, SLY_FAULT, BRAGGING))  # what the launcher passes
    with pytest.raises(SystemExit):  # an unknown lie
        lies_of("--drop-everything", "1")
    with pytest.raises(ValueError, match="when must be"):
        Lies(corrupt_outputs=0.05, when="sometimes")


def test_spot_checks_are_on_by_default():
    assert 0 < SessionPolicy().spot_check == DEFAULT_SPOT_CHECK


def test_spot_check_must_be_a_fraction():
    with pytest.raises(ValueError, match="fraction"):
        SessionPolicy(spot_check=1.5)


# --- a swarm with a liar -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(tiny_llama_dir):
    """Honest nodes 0 and 1, and the liar as node 2; every one serves all 6 blocks."""
    args = ["--model", str(tiny_llama_dir), "--blocks", "0:6"]
    with LocalSwarm([args, args]) as local_swarm:
        local_swarm.add_node(args, lies=FAULT)  # stopped with the others
        yield local_swarm


@pytest.fixture
def client(swarm, tiny_llama_dir):
    with SwarmClient(swarm.initial_peers, model=str(tiny_llama_dir), policy=POLICY) as swarm_client:
        yield swarm_client


@pytest.fixture
def extra_node(swarm, tiny_llama_dir):
    """Starts a fourth node serving all blocks, lying as the given `Lies` say, joined to the swarm; it is
    stopped (and withdraws its record) at the end of the test."""
    started = []

    def start(lies: Lies):
        started.append(start_node(["--model", str(tiny_llama_dir), "--blocks", "0:6"], swarm.initial_peers, lies=lies))
        return started[-1]

    yield start
    for node in started:
        node.stop()


@pytest.fixture(scope="module")
def expected(tiny_llama_reference):
    return reference_greedy_tokens(tiny_llama_reference, PROMPT, TOKENS)


def node_id(node) -> str:
    return node.info["node_id"]


def session_on(client, node, **kwargs) -> InferenceSession:
    """A session whose one hop is `node`, whatever routing would choose."""
    wait_until_listed(client, node)
    records = {record.address: record for record in client.servers()}
    return client.inference_session(max_length=64, route=[Hop(records[node.address], 0, 6)], **kwargs)


def usable_ids(client) -> set[str]:
    return {record.node_id for record in client.routes.usable_servers()}


def wait_until_listed(client, node) -> None:
    wait_until(lambda: node_id(node) in {record.node_id for record in client.servers()}, f"node {node_id(node)} appears in the DHT")


@pytest.mark.slow
def test_a_liar_on_the_route_is_outvoted_banned_and_replaced(swarm, client, expected):
    honest, liar = swarm.nodes[:2], swarm.nodes[2]
    with session_on(client, liar) as session:
        assert greedy_decode(session, PROMPT, TOKENS) == expected
        [caught] = session.misbehaviours
        assert caught.node_id == node_id(liar) and caught.blocks == (0, 6) and caught.step == 0
        assert caught.reason.startswith("outvoted") and caught.difference > 20 * POLICY.spot_check_tolerance
        assert client.routes.misbehaviours == [caught]
        [failover] = session.failovers
        assert failover.failed_node == node_id(liar) and failover.replayed_tokens == len(PROMPT)
        assert session.route[0].record.node_id in {node_id(node) for node in honest}
        stats = session.spot_checks
        # every step of every hop was checked; after the liar left, the other honest node agreed each time
        assert stats.checks == TOKENS + 1 and stats.disputes == 1 and stats.agreed == TOKENS and stats.unverified == 0
    assert usable_ids(client) == {node_id(node) for node in honest}


@pytest.mark.slow
def test_with_a_single_verifier_a_lying_hop_contradicts_itself(swarm, client, expected):
    honest, other_honest, liar = swarm.nodes
    client.routes.ban(node_id(other_honest), 3600)  # only one node is left to verify the liar
    with session_on(client, liar) as session:
        assert greedy_decode(session, PROMPT, TOKENS) == expected
        [caught] = session.misbehaviours
        assert caught.node_id == node_id(liar) and caught.reason.startswith("inconsistent")
        assert [hop.record.node_id for hop in session.route] == [node_id(honest)]
        assert [event.failed_node for event in session.failovers] == [node_id(liar)]
        # the only node left is the hop itself: nobody can verify it any more
        assert session.spot_checks.unverified == TOKENS


@pytest.mark.slow
def test_a_lying_verifier_is_caught_and_the_honest_hop_kept(swarm, client, expected):
    honest, other_honest, liar = swarm.nodes
    client.routes.ban(node_id(other_honest), 3600)  # the liar is the only possible verifier
    with session_on(client, honest) as session:
        assert greedy_decode(session, PROMPT, TOKENS) == expected
        [caught] = session.misbehaviours
        assert caught.node_id == node_id(liar) and caught.reason.startswith("inconsistent")
        assert session.failovers == [] and session.route[0].record.node_id == node_id(honest)
    assert node_id(liar) not in usable_ids(client)


@pytest.mark.slow
def test_generate_catches_the_liar_wherever_routing_puts_it(swarm, client, expected):
    # the route is one of the three nodes; if it is an honest one, the liar is picked as its verifier
    # on some step (each time with probability 1/2) and outvoted by the other honest node
    result = client.generate(PROMPT, max_new_tokens=TOKENS)
    assert result.token_ids == until_eos(expected, {2})
    assert [m.node_id for m in client.routes.misbehaviours] == [node_id(swarm.nodes[2])]
    assert usable_ids(client) == {node_id(node) for node in swarm.nodes[:2]}


@pytest.mark.slow
def test_honest_nodes_are_never_flagged(swarm, client, tiny_llama_reference, expected):
    client.routes.ban(node_id(swarm.nodes[2]), 3600)  # only the honest nodes remain
    sessions, outputs = [], {}

    def decode(name, prompt, expected_tokens):
        with client.inference_session(max_length=64) as session:
            sessions.append(session)
            outputs[name] = (greedy_decode(session, prompt, TOKENS), expected_tokens)

    # two sessions at once (the nodes batch their decode steps), and one padded batch
    other = [250, 8, 13, 99]
    threads = [
        threading.Thread(target=decode, args=("first", PROMPT, expected)),
        threading.Thread(target=decode, args=("second", other, reference_greedy_tokens(tiny_llama_reference, other, TOKENS))),
    ]
    for thread in threads:
        thread.start()
    with client.inference_session(max_length=64) as padded:
        ids = torch.tensor([PROMPT, [0, 0] + other])
        mask = torch.tensor([[True] * 6, [False, False] + [True] * 4])
        logits = padded.step(ids, mask)
        for _ in range(TOKENS):
            logits = padded.step(logits.argmax(dim=-1)[:, None])
    for thread in threads:
        thread.join(timeout=300)
    assert all(tokens == wanted for tokens, wanted in outputs.values()) and len(outputs) == 2
    for session in [*sessions, padded]:
        stats = session.spot_checks
        assert stats.checks == TOKENS + 1 and stats.agreed == stats.checks, stats
        assert session.misbehaviours == [] and session.failovers == []
    assert client.routes.misbehaviours == []
    assert usable_ids(client) == {node_id(node) for node in swarm.nodes[:2]}


def two_hop_session(client, first, second) -> InferenceSession:
    """A session running blocks 0:3 on node `first` and 3:6 on node `second`."""
    records = {record.address: record for record in client.servers()}
    return client.inference_session(max_length=64, route=[Hop(records[first.address], 0, 3), Hop(records[second.address], 3, 6)])


def restrict_verifiers(session, allowed) -> None:
    """Only nodes for which `allowed(hop, record)` holds may verify (white-box: to make the scenario exact)."""
    candidates = session._spot_checker.candidates
    session._spot_checker.candidates = lambda hop: [record for record in candidates(hop) if allowed(hop, record)]


@pytest.mark.slow
def test_lies_that_passed_unverified_are_repaired_downstream(swarm, client, tiny_llama_reference, caplog):
    honest, other_honest, liar = swarm.nodes
    with two_hop_session(client, liar, honest) as session:
        # the first step of the liar's hop finds no verifier, so its lie reaches the next hop's cache;
        # from the second step on it is checked (and the next hop only ever by the other honest node)
        restrict_verifiers(
            session, lambda hop, record: session._steps > 0 if hop.start == 0 else record.node_id == node_id(other_honest)
        )
        tokens = greedy_decode(session, PROMPT, TOKENS)
        [caught] = session.misbehaviours
        assert caught.node_id == node_id(liar) and caught.blocks == (0, 3) and (caught.step, caught.position) == (1, 6)
        assert "rebuilding blocks 3:6" in caplog.text
        assert session.route[1].record.node_id == node_id(honest)
    # the first token came from corrupted states; everything after it from repaired caches
    assert tokens[1:] == reference_greedy_tokens(tiny_llama_reference, PROMPT + tokens[:1], TOKENS - 1)


@pytest.mark.slow
def test_a_verifier_judged_lying_is_replaced_where_it_runs_another_hop(swarm, client, expected, caplog):
    honest, other_honest, liar = swarm.nodes
    with two_hop_session(client, liar, honest) as session:
        # nobody verifies the liar's own hop 0:3, and the liar is the only verifier of hop 3:6: it is
        # caught there, and its hop 0:3 replaced within the same step, the hop after it rebuilt
        restrict_verifiers(session, lambda hop, record: hop.start == 3 and record.node_id == node_id(liar))
        assert greedy_decode(session, PROMPT, TOKENS) == expected
        [caught] = session.misbehaviours
        assert caught.node_id == node_id(liar) and caught.blocks == (3, 6) and caught.step == 0
        assert [event.failed_node for event in session.failovers] == [node_id(liar)]
        assert "rebuilding blocks 3:6" in caplog.text
        assert node_id(liar) not in [hop.record.node_id for hop in session.route]


@pytest.mark.slow
def test_lossy_links_do_not_look_like_lies(swarm, tiny_llama_dir):
    # int8_block inputs differ from the exact ones by far more than the tolerance: the verifier must get
    # what the node decoded, and the checked reply, compressed as every reply, is allowed the codec's error
    with SwarmClient(swarm.initial_peers, model=str(tiny_llama_dir), policy=POLICY, link_quality="int8_block") as lossy:
        lossy.routes.ban(node_id(swarm.nodes[2]), 3600)
        with lossy.inference_session(max_length=64) as session:
            greedy_decode(session, PROMPT, TOKENS)
            sent = session._hops[0].sent
            assert all(step.seen is not None for step in sent)  # the links did compress
            assert difference(sent[0].hidden, sent[0].seen) > 3 * POLICY.spot_check_tolerance
            stats = session.spot_checks
            assert stats.checks == TOKENS + 1 and stats.agreed == stats.checks, stats
            assert session.misbehaviours == [] and session.failovers == []


@pytest.mark.slow
def test_a_liar_cannot_tell_checked_steps_on_compressed_links(swarm, extra_node, tiny_llama_dir):
    # it lies only on replies asked for in a codec; a checked step asks for the same codec as any other,
    # so it lies on the first step, which is always checked, and is caught there (at the default rate)
    sly = extra_node(SLY_FAULT)
    policy = SessionPolicy(spot_check_seed=0, replacement_wait=20, min_step_deadline=5.0)
    with SwarmClient(swarm.initial_peers, model=str(tiny_llama_dir), policy=policy, link_quality="int8_block") as client:
        client.routes.ban(node_id(swarm.nodes[2]), 3600)  # the other liar lies on every reply: keep it out
        wait_until_listed(client, sly)
        with session_on(client, swarm.nodes[0]) as honest_session:  # the honest output on these links
            expected = greedy_decode(honest_session, PROMPT, TOKENS)
            assert honest_session.misbehaviours == [] and honest_session.spot_checks.agreed >= 1
        with session_on(client, sly) as session:
            assert greedy_decode(session, PROMPT, TOKENS) == expected
            assert all(step.seen is not None for step in session._hops[0].sent)  # the links did compress
            [caught] = session.misbehaviours
            assert caught.node_id == node_id(sly) and caught.step == 0 and caught.reason.startswith("outvoted")
            assert caught.tolerance > POLICY.spot_check_tolerance  # allowing for int8_block's error
            assert [event.failed_node for event in session.failovers] == [node_id(sly)]
        assert client.routes.misbehaviours == [caught]
        assert node_id(sly) not in usable_ids(client)


@pytest.mark.slow
def test_an_absurd_throughput_announcement_does_not_win_every_route(swarm, extra_node, tiny_llama_dir):
    braggart = extra_node(BRAGGING)
    honest = swarm.nodes[0]
    with SwarmClient(swarm.initial_peers, model=str(tiny_llama_dir), policy=SessionPolicy(spot_check=0.0)) as client:
        for other in swarm.nodes[1:]:
            client.routes.ban(node_id(other), 3600)  # the braggart against one honest node
        wait_until_listed(client, braggart)
        announced = {record.node_id: record.throughput for record in client.routes.usable_servers()}
        assert announced[node_id(braggart)] == BRAGGING_THROUGHPUT

        def trusted() -> dict[str, float]:
            return {record.node_id: record.throughput for record in client.routes.trusted_servers()}

        # nothing measured yet: it counts as twice the median announcement at most (here the honest
        # node's), so it is tried, as a node that may really be faster would be
        assert trusted()[node_id(braggart)] == UNMEASURED_CEILING_FACTOR * announced[node_id(honest)]
        [hop] = client.route()
        assert hop.record.node_id == node_id(braggart)
        with client.inference_session(max_length=64, route=[hop]) as session:
            greedy_decode(session, PROMPT, 4)
        # measured, it counts at the speed the client saw, not at its word
        measured = client.routes.speeds.measured(node_id(braggart))
        assert trusted()[node_id(braggart)] == measured < BRAGGING_THROUGHPUT
        # so does the honest node once measured, and routes follow those measurements alone
        with session_on(client, honest) as session:
            greedy_decode(session, PROMPT, 4)
        speeds = trusted()
        assert speeds[node_id(honest)] == min(announced[node_id(honest)], client.routes.speeds.measured(node_id(honest)))
        assert [hop.record.node_id for hop in client.route()] == [max(speeds, key=speeds.get)]
