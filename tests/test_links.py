"""Compressed activations on real links: codecs agreed per link, chosen per step, and bad payloads refused.

A 2-node SmolLM2 swarm on loopback; one node holds int8 weights. Loopback is fast, so the adaptive
choice would keep links uncompressed: the swarm tests pin codecs, and the choice itself is tested on
measured costs with slow and fast bandwidths.
"""

from dataclasses import replace

import grpc
import pytest
import torch

from devtools.decoding import greedy_decode
from devtools.launcher import LocalSwarm
from edgeswarm import SessionPolicy, SwarmClient
from edgeswarm.model.calibration import load_or_fit_basis
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.codecs import encode_tensor
from edgeswarm.protocol.link_policy import (
    QUALITY_CODECS,
    LinkQuality,
    choose_codec,
    measured_costs,
)
from edgeswarm.protocol.tensors import serialize_tensor
from tests.support import node_channel, node_info, swarm_member, wait_until

pytestmark = pytest.mark.slow
PROMPT = "The Python standard library offers modules for files, networking and text processing. Among them"


@pytest.fixture(scope="module")
def basis_cache(smollm):
    """The basis in the cache that this process and the nodes share (model.cache_dir), fitted if missing."""
    return load_or_fit_basis(smollm)


@pytest.fixture(scope="module")
def swarm(basis_cache):
    nodes = [["--blocks", "0:15", "--semantic-basis", "auto"], ["--blocks", "15:30", "--semantic-basis", "auto", "--quant", "int8"]]
    with LocalSwarm(nodes) as local_swarm, swarm_member(local_swarm.initial_peers):
        yield local_swarm


def _client(swarm, quality: str) -> SwarmClient:
    # relayed: every link crossing passes through the client, which counts its bytes
    client = SwarmClient(swarm.initial_peers, link_quality=quality, mdns=False, policy=SessionPolicy(forwarding=False))
    wait_until(
        lambda: len(servers := client.servers()) >= 2 and all(record.semantic_basis for record in servers),
        "both nodes announce their semantic basis",
        timeout=180,  # loading the cached basis takes seconds, but minutes on a loaded machine
        interval=0.5,
    )
    return client


def _decode_with(client: SwarmClient, prompt_ids: list[int], count: int) -> tuple[list[int], int, torch.Tensor]:
    """Greedy tokens, link bytes of the prefill and the prefill's last logits."""
    with client.inference_session(max_length=256) as session:
        logits = session.step(torch.tensor([prompt_ids]))
        prefill_bytes = session.link_bytes
        tokens = [int(logits[0].argmax())]
        for _ in range(count - 1):
            tokens.append(int(session.step(torch.tensor([[tokens[-1]]]))[0].argmax()))
    return tokens, prefill_bytes, logits


def test_nodes_announce_codecs_basis_and_weight_mode(swarm, basis_cache):
    with _client(swarm, "lossless") as client:  # waits until both nodes announce the semantic codec
        assert {record.semantic_basis for record in client.servers()} == {basis_cache.digest}
    infos = [node_info(node) for node in swarm.nodes]
    assert [info.weight_quant for info in infos] == ["none", "int8"]
    assert all(info.semantic_basis == basis_cache.digest and "semantic" in info.codecs for info in infos)
    fp32_per_block = infos[0].weight_bytes / 15
    assert infos[1].weight_bytes / 15 == pytest.approx(0.25 * fp32_per_block, rel=0.02)


# semantic: 8.5x on most messages, but token embeddings (boundary 0) are nearly full-rank and fall back
# to the lossless codec, which takes the prompt's total down to about 4x
@pytest.mark.parametrize("codec, min_reduction, min_cosine", [("int8_outlier", 3.8, 0.99), ("int4_block", 6.5, 0.9), ("semantic", 3.5, 0.9)])
def test_pinned_codec_shrinks_links_and_stays_close(swarm, smollm, codec, min_reduction, min_cosine):
    prompt_ids = smollm.tokenizer()(PROMPT).input_ids
    with _client(swarm, "lossless") as client:
        _, exact_bytes, exact_logits = _decode_with(client, prompt_ids, 6)
    with _client(swarm, codec) as client:
        _, compressed_bytes, logits = _decode_with(client, prompt_ids, 6)
    assert exact_bytes / compressed_bytes >= min_reduction
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), exact_logits.flatten(), dim=0)
    assert min_cosine < cosine < 1.0  # close, and really compressed


def test_quality_budget_keeps_greedy_output_on_a_short_answer(swarm, smollm):
    prompt_ids = smollm.tokenizer()(PROMPT).input_ids
    with _client(swarm, "lossless") as client:
        with client.inference_session(max_length=256) as session:
            exact = greedy_decode(session, prompt_ids, 8)
    with _client(swarm, "prefill=int8_outlier,decode=int8_outlier") as client:
        with client.inference_session(max_length=256) as session:
            compressed = greedy_decode(session, prompt_ids, 8)
    assert compressed == exact


CODEC_SECONDS_PER_VALUE = 5e-9  # encode+decode CPU time of a value, of the order measured on an idle machine


def test_adaptive_choice_follows_bandwidth_and_budget():
    # measured bytes, but fixed CPU times: those measured here follow the machine's load, not the codecs
    costs = {
        name: replace(cost, seconds_per_value=0.0 if name == "none" else CODEC_SECONDS_PER_VALUE, seconds_per_message=0.0)
        for name, cost in measured_costs(576).items()
    }
    values = 128 * 576
    everything = set(QUALITY_CODECS["max"]) - {"semantic"}
    slow, fast = 5e6 / 8, 10e9 / 8  # 5 Mbit/s and 10 Gbit/s in bytes/s
    assert choose_codec(QUALITY_CODECS["lossless"], everything, values, slow, costs) in ("none", "lossless")
    assert choose_codec(QUALITY_CODECS["high"], everything, values, slow, costs) == "int8_outlier"
    assert choose_codec(QUALITY_CODECS["balanced"], everything, values, slow, costs) == "int4_block"
    assert choose_codec(QUALITY_CODECS["max"], everything, values, fast, costs) == "none"
    assert choose_codec(QUALITY_CODECS["high"], {"none"}, values, slow, costs) == "none"  # the node speaks no other
    quality = LinkQuality.parse("prefill=balanced,decode=high")
    assert quality.allowed_codecs(128) == QUALITY_CODECS["balanced"]
    assert quality.allowed_codecs(1) == QUALITY_CODECS["high"]
    with pytest.raises(ValueError, match="unknown link quality 'ultra'"):
        LinkQuality.parse("ultra")


def _step(hidden: pb.Tensor, reply_codec: str = "") -> pb.SessionRequest:
    length = hidden.shape[1]
    return pb.SessionRequest(
        step=pb.SessionStep(
            hidden_states=hidden,
            position_ids=serialize_tensor(torch.arange(length)[None]),
            attention_mask=serialize_tensor(torch.ones(1, length, dtype=torch.bool)),
            reply_codec=reply_codec,
        )
    )


def _session(node, step: pb.SessionRequest):
    opening = pb.SessionRequest(open=pb.SessionOpen(session_id="bad-input", model_id=node_info(node).model_id, start_block=0, end_block=15, max_length=64))
    with node_channel(node) as channel:
        return list(pb_grpc.BlockServiceStub(channel).InferenceSession(iter([opening, step]), timeout=30))


def test_bad_payloads_get_invalid_argument_and_the_node_serves_on(swarm, basis_cache):
    node = swarm.nodes[0]
    hidden = torch.randn(1, 4, 576)
    unknown = encode_tensor(hidden, "int8_block")
    unknown.codec = "zstd"
    nan_scales = encode_tensor(hidden, "int8_block")
    nan_scales.scales = b"\xff\x7f" * (len(nan_scales.scales) // 2)
    truncated = encode_tensor(hidden, "int4_block")
    truncated.data = truncated.data[:-3]
    foreign_basis = encode_tensor(hidden, "semantic", basis=basis_cache, boundary=0, max_relative_error=float("inf"))
    foreign_basis.basis = "0123456789abcdef/0"
    cases = [
        (_step(unknown), "unknown codec 'zstd'"),
        (_step(nan_scales), "NaN or Inf"),
        (_step(truncated), "data of shape"),
        (_step(foreign_basis), "0123456789abcdef"),
        (_step(encode_tensor(hidden, "int8_block"), reply_codec="gzip"), "unknown reply codec 'gzip'"),
    ]
    for request, reason in cases:
        with pytest.raises(grpc.RpcError) as error:
            _session(node, request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in error.value.details()
    replies = _session(node, _step(encode_tensor(hidden, "int8_outlier"), reply_codec="int8_outlier"))
    assert replies[0].hidden_states.codec == "int8_outlier" and replies[0].cache_length == 4
