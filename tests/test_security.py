"""Signed records and private swarms, on real nodes of a tiny model and a real hivemind DHT."""

import time

import hivemind
import pytest
import torch
from hivemind.utils import get_dht_time

from devtools.launcher import LocalSwarm
from edgeswarm import SwarmClient
from edgeswarm.protocol.channels import use_swarm_key
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.records import servers_key
from edgeswarm.protocol.signing import sign_record
from edgeswarm.protocol.swarm_key import generate_swarm_key, read_swarm_key
from edgeswarm.swarm.errors import RemoteError
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.transport import SpanStream
from tests.support import one_step, wait_until

pytestmark = pytest.mark.slow


def store_raw(dht, key, subkey, value, ttl=30.0):
    """Stores as a malicious peer would: from a DHT peer without the swarm's validator."""
    return dht.store(key, subkey=subkey, value=value, expiration_time=get_dht_time() + ttl)


def wait_for_servers(client, count):
    """The announced servers, once there are at least `count`."""

    def servers():
        found = client.servers()
        return found if len(found) >= count else None

    return wait_until(servers, f"{count} servers are announced", interval=0.5)


def test_a_replayed_session_step_is_refused(tiny_node, tiny_llama_dir):
    with SwarmClient(tiny_node.initial_peers, model=str(tiny_llama_dir)) as client:
        [record] = wait_for_servers(client, 1)
        hidden = torch.zeros(1, 1, client.model.config.hidden_size)
        positions, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
        stream = SpanStream(Hop(record, 0, 6), "replay", client.model.model_id, 16, connect_timeout=5)
        one_step(stream, hidden, positions, mask, 10)
        stream._next_step_id -= 1  # send step 0 again
        with pytest.raises(RemoteError, match="INVALID_ARGUMENT: step 0 is replayed"):
            one_step(stream, hidden, positions + 1, mask, 10)
        stream.close()
        assert client.generate([1, 2, 3], max_new_tokens=2).finish_reason in ("eos", "length")  # still serving


def test_forged_unsigned_and_replayed_records_are_ignored(tiny_node, tiny_llama_dir):
    swarm = tiny_node
    with SwarmClient(swarm.initial_peers, model=str(tiny_llama_dir)) as client:
        [honest] = wait_for_servers(client, 1)
        key = servers_key(client.model.model_id)
        attacker_dht = hivemind.DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True)
        raw_before = client.dht.get(key, latest=True).value[honest.node_id].value
        attacker = NodeIdentity.generate()
        forged = {**honest.to_dict(), "node_id": attacker.fingerprint, "address": "127.0.0.1:1"}
        envelope = sign_record(attacker, forged, expires_at=get_dht_time() + 30, sequence=time.time_ns() // 1000)
        # the swarm's DHT peers refuse to store these
        assert not store_raw(attacker_dht, key, "unsigned-node", forged)  # no signature at all
        assert not store_raw(attacker_dht, key, honest.node_id, {"signed": envelope, "swarm_tag": b""})  # not signed by that node
        tampered = {"signed": {**raw_before["signed"], "payload": {**raw_before["signed"]["payload"], "address": "127.0.0.1:1"}}, "swarm_tag": b""}
        assert not store_raw(attacker_dht, key, "tampered-node", tampered)
        servers = client.servers()
        assert [record.node_id for record in servers] == [honest.node_id]
        assert servers[0].address == honest.address
        # a replay: the honest node's older record, stored again once the node has announced a newer one
        def stored_sequence() -> int:
            return client.dht.get(key, latest=True).value[honest.node_id].value["signed"]["sequence"]

        old_sequence = raw_before["signed"]["sequence"]
        newer_sequence = wait_until(lambda: stored_sequence() > old_sequence and stored_sequence(), timeout=60)
        signed_expiry = raw_before["signed"]["expires_at"]
        assert not store_raw(attacker_dht, key, honest.node_id, raw_before, ttl=60.0)  # may not outlive its signature
        store_raw(attacker_dht, key, honest.node_id, raw_before, ttl=signed_expiry - get_dht_time())  # older than the stored one
        assert stored_sequence() >= newer_sequence  # the newer one stands
        assert [(r.node_id, r.address) for r in client.servers()] == [(honest.node_id, honest.address)]
        attacker_dht.shutdown()


def test_a_node_without_the_swarm_key_can_neither_serve_nor_be_routed_to(tiny_llama_dir, tmp_path):
    key_file = str(tmp_path / "swarm.key")
    generate_swarm_key(key_file)
    other_key = str(tmp_path / "other.key")
    generate_swarm_key(other_key)
    model = ["--model", str(tiny_llama_dir)]
    members = [[*model, "--blocks", "0:6", "--swarm-key", key_file]]
    with LocalSwarm(members) as swarm:
        peers = swarm.initial_peers
        with LocalSwarm([[*model, "--blocks", "0:6", "--initial-peers", *peers, "--swarm-key", other_key]]) as outsiders:
            member = swarm.nodes[0].info
            outsider = outsiders.nodes[0].info
            try:
                with SwarmClient(peers, model=str(tiny_llama_dir), swarm_key=read_swarm_key(key_file)) as client:
                    # the outsider announced itself before it reported ready, but members never see its record
                    assert [record.node_id for record in wait_for_servers(client, 1)] == [member["node_id"]]
                    assert client.generate([1, 2, 3], max_new_tokens=4).finish_reason in ("eos", "length")  # members serve it
            finally:
                use_swarm_key(None)  # this process's later calls carry no swarm token
            with SwarmClient(peers, model=str(tiny_llama_dir)) as keyless:
                # a keyless client reads the member's record (it checks no swarm tag), but the member refuses
                # each of its calls, however well signed
                records = {record.node_id: record for record in wait_for_servers(keyless, 2)}
                assert set(records) == {member["node_id"], outsider["node_id"]}
                record = records[member["node_id"]]
                with pytest.raises(RemoteError, match="UNAUTHENTICATED: this node belongs to a private swarm"):
                    one_step(SpanStream(Hop(record, 0, 6), "keyless", keyless.model.model_id, 16, connect_timeout=5),
                        torch.zeros(1, 1, keyless.model.config.hidden_size), torch.zeros(1, 1, dtype=torch.long),
                        torch.ones(1, 1, dtype=torch.bool), 10)
