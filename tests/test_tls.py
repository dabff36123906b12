"""TLS between nodes and to the API, with certificates bound to the identities the nodes announce."""

import json
import ssl
import urllib.request
from dataclasses import replace

import grpc
import pytest

from edgeswarm import SwarmClient
from devtools.launcher import LocalSwarm
from edgeswarm.proto import api_pb2 as api
from edgeswarm.proto import api_pb2_grpc as api_grpc
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.channels import open_channel, register_certificate
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm.dht import RecordAuth
from tests.support import wait_until


def test_a_certificate_counts_only_for_the_identity_it_is_bound_to():
    node, impostor = NodeIdentity.generate(), NodeIdentity.generate()
    certificate = node.tls_certificate(["127.0.0.1"])[0].decode()
    assert register_certificate(node.fingerprint, certificate)
    assert not register_certificate(impostor.fingerprint, certificate)
    assert not register_certificate(node.fingerprint, "not a certificate")


@pytest.mark.slow
def test_nodes_serve_over_tls_and_clients_pin_the_announced_certificate(tiny_llama_dir, tmp_path):
    model = ["--model", str(tiny_llama_dir), "--tls"]
    with LocalSwarm([[*model, "--blocks", "0:3", "--api-port", "0", "--http-port", "0"], [*model, "--blocks", "3:6"]]) as swarm:
        first = swarm.nodes[0].info
        assert first["tls_cert"].startswith("-----BEGIN CERTIFICATE-----")
        with SwarmClient(swarm.initial_peers, model=str(tiny_llama_dir)) as client:
            records = client.servers()
            assert len(records) == 2 and all(record.tls_cert for record in records)
            assert client.generate([1, 2, 3], max_new_tokens=4).finish_reason in ("eos", "length")
            # a stranger's signed record that names the first node's address pins only the stranger's own
            # certificate (pins are by node id), so the first node stays reachable
            stranger = NodeIdentity.generate()
            victim = next(record for record in records if record.node_id == first["node_id"])
            forged = replace(victim, node_id=stranger.fingerprint, tls_cert=stranger.tls_certificate(["127.0.0.1"])[0].decode())
            swarm_dht.use_auth(client.dht, RecordAuth(stranger))
            assert swarm_dht.announce(client.dht, forged, ttl=30)
            wait_until(lambda: stranger.fingerprint in {record.node_id for record in client.servers()})
            with open_channel(victim.address, victim.node_id) as channel:
                assert pb_grpc.BlockServiceStub(channel).NodeInfo(pb.NodeInfoRequest(), timeout=10).model_id
        # plaintext is refused
        with grpc.insecure_channel(first["address"]) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.BlockServiceStub(channel).NodeInfo(pb.NodeInfoRequest(), timeout=5)
            assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        # an app reaches the API over TLS, trusting the certificate the node announced
        credentials = grpc.ssl_channel_credentials(root_certificates=first["tls_cert"].encode())
        options = [("grpc.ssl_target_name_override", first["node_id"])]
        with grpc.secure_channel(first["api_address"], credentials, options=options) as channel:
            [model_info] = api_grpc.SwarmAPIStub(channel).ListModels(api.ListModelsRequest(), timeout=10).models
            assert model_info.servable
        # and the HTTP API is HTTPS with the same certificate (its SANs hold the node's address)
        certificate = tmp_path / "node.pem"
        certificate.write_text(first["tls_cert"])
        context = ssl.create_default_context(cafile=str(certificate))
        with urllib.request.urlopen(f"https://{first['http_address']}/v1/models", context=context, timeout=30) as reply:
            assert json.load(reply)["data"][0]["owned_by"] == "edgeswarm"
