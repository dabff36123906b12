"""Signed DHT envelopes: round trips, every way to forge or replay one, and random mutations."""

from __future__ import annotations

import copy
import math
import random
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hivemind.utils.serializer import MSGPackSerializer

from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.protocol.signing import (
    DEFAULT_MAX_TTL,
    MAX_NESTING,
    MAX_PAYLOAD_BYTES,
    ForgedRecordError,
    ReplayedRecordError,
    ReplayGuard,
    record_message,
    sign_record,
    verify_record,
)

NOW = 1_700_000_000.0
EXPIRES = NOW + 600


def record_payload(node_id: str) -> dict[str, Any]:
    record = ServerRecord(
        node_id=node_id,
        address="10.0.0.5:31337",
        model_id="smollm2-135m",
        start_block=0,
        end_block=8,
        throughput=12.5,
        kv_free_bytes=1 << 30,
        links={"peer": [1e6, 0.01]},
        codecs=("none", "fp16"),
    )
    return record.to_dict()


@pytest.fixture(scope="module")
def envelope(identity) -> dict[str, Any]:
    return sign_record(identity, record_payload(identity.fingerprint), EXPIRES, sequence=7)


def forge(signer: NodeIdentity, payload: dict, expires_at: float = EXPIRES, sequence: int = 1) -> dict[str, Any]:
    """An envelope signed correctly over whatever it says, bypassing sign_record's own checks."""
    signature = signer.sign(record_message(payload, signer.public_key_bytes, expires_at, sequence))
    return {
        "payload": payload,
        "public_key": signer.public_key_bytes,
        "expires_at": expires_at,
        "sequence": sequence,
        "signature": signature,
    }


def changed(envelope: dict, **fields: Any) -> dict[str, Any]:
    return {**copy.deepcopy(envelope), **fields}


def flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


# --- round trips


def test_round_trip(identity, envelope):
    payload, fingerprint = verify_record(envelope, NOW)
    assert fingerprint == identity.fingerprint
    assert payload == envelope["payload"]
    assert ServerRecord.from_dict(payload, num_blocks=30).node_id == fingerprint
    assert verify_record(envelope, NOW, owner=identity.fingerprint)[1] == fingerprint


def test_payload_without_node_id_is_fine(identity):
    assert (
        verify_record(sign_record(identity, {"anything": [1, 2.5, b"x", None]}, EXPIRES, 0), NOW)[1]
        == identity.fingerprint
    )


@pytest.mark.parametrize(
    "dumps, loads",
    [
        (lambda value: msgpack.packb(value, use_bin_type=True), lambda data: msgpack.unpackb(data, raw=False)),
        (MSGPackSerializer.dumps, MSGPackSerializer.loads),  # what the hivemind DHT stores
    ],
    ids=["msgpack", "hivemind"],
)
def test_survives_msgpack(envelope, dumps, loads):
    restored = loads(dumps(envelope))
    assert restored == envelope
    assert verify_record(restored, NOW) == verify_record(envelope, NOW)


def test_signature_covers_canonical_form(envelope):
    """Key order and tuple-vs-list (hivemind keeps tuples) do not change what was signed."""
    payload = dict(reversed(envelope["payload"].items()))
    payload["codecs"] = tuple(payload["codecs"])
    reordered = changed(envelope, payload=payload)
    assert verify_record(MSGPackSerializer.loads(MSGPackSerializer.dumps(reordered)), NOW)


def test_lifetime_bounds_are_inclusive(identity):
    assert verify_record(sign_record(identity, {}, NOW, 0), NOW)
    assert verify_record(sign_record(identity, {}, NOW + DEFAULT_MAX_TTL, 0), NOW)
    assert verify_record(sign_record(identity, {}, NOW + 7200, 0), NOW, max_ttl=7200)


# --- sign_record refuses what would never verify


@pytest.mark.parametrize(
    "payload, expires_at, sequence, error, message",
    [
        ({"node_id": "someone-else"}, EXPIRES, 0, ValueError, "not this identity's"),
        ({"blob": b"x" * MAX_PAYLOAD_BYTES}, EXPIRES, 0, ValueError, "over the 65536 limit"),
        ({"set": {1, 2}}, EXPIRES, 0, TypeError, "set is not a msgpack type"),
        ({1: "int key"}, EXPIRES, 0, TypeError, "keys must be str"),
        ({"big": 2**64}, EXPIRES, 0, ValueError, "does not fit msgpack"),
        ([("not", "a dict")], EXPIRES, 0, TypeError, "payload is list, not dict"),
        ({}, math.inf, 0, ValueError, "not finite"),
        ({}, "123", 0, ValueError, "expires_at is str, not float"),
        ({}, EXPIRES, -1, ValueError, "outside"),
        ({}, EXPIRES, True, ValueError, "sequence is bool, not int"),
    ],
)
def test_sign_record_refuses(identity, payload, expires_at, sequence, error, message):
    with pytest.raises(error, match=message):
        sign_record(identity, payload, expires_at, sequence)


# --- every forgery


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


FORGERIES: dict[str, tuple[Callable[[dict, NodeIdentity, NodeIdentity], Any], str]] = {
    "not a dict": (lambda e, a, b: list(e.items()), "envelope is list, not dict"),
    "missing signature": (lambda e, a, b: {k: v for k, v in e.items() if k != "signature"}, "envelope lacks signature"),
    "missing payload": (lambda e, a, b: {k: v for k, v in e.items() if k != "payload"}, "envelope lacks payload"),
    "extra field": (lambda e, a, b: changed(e, extra=1), "envelope has unexpected fields 'extra'"),
    "payload not a dict": (lambda e, a, b: changed(e, payload=[1]), "payload is list, not dict"),
    "public key as str": (lambda e, a, b: changed(e, public_key="k" * 32), "public_key is str, not bytes"),
    "short public key": (lambda e, a, b: changed(e, public_key=e["public_key"][:31]), "public_key is 31 bytes, not 32"),
    "long signature": (lambda e, a, b: changed(e, signature=e["signature"] + b"\0"), "signature is 65 bytes, not 64"),
    "expiry as int": (lambda e, a, b: changed(e, expires_at=int(EXPIRES)), "expires_at is int, not float"),
    "expiry nan": (lambda e, a, b: changed(e, expires_at=math.nan), "expires_at nan is not finite"),
    "sequence as float": (lambda e, a, b: changed(e, sequence=7.0), "sequence is float, not int"),
    "sequence as bool": (lambda e, a, b: changed(e, sequence=True), "sequence is bool, not int"),
    "negative sequence": (lambda e, a, b: changed(e, sequence=-1), "outside"),
    "flipped signature": (lambda e, a, b: changed(e, signature=flip(e["signature"], 10)), "bad signature"),
    "payload changed": (
        lambda e, a, b: changed(e, payload={**e["payload"], "throughput": 9999.0}),
        "bad signature: the record was changed after signing",
    ),
    "payload field added": (lambda e, a, b: changed(e, payload={**e["payload"], "x": 1}), "bad signature"),
    "expiry extended": (lambda e, a, b: changed(e, expires_at=e["expires_at"] + 1), "bad signature"),
    "sequence bumped": (lambda e, a, b: changed(e, sequence=e["sequence"] + 1), "bad signature"),
    "key swapped": (lambda e, a, b: changed(e, public_key=b.public_key_bytes), "bad signature"),
    "re-signed by another key": (
        lambda e, a, b: changed(e, public_key=b.public_key_bytes, signature=forge(b, e["payload"])["signature"]),
        "bad signature",
    ),
    "expired": (lambda e, a, b: sign_record(a, e["payload"], NOW - 1, 1), r"expired 1\.0 s ago"),
    "too far ahead": (
        lambda e, a, b: sign_record(a, e["payload"], NOW + DEFAULT_MAX_TTL + 1, 1),
        "beyond the 3600 s limit",
    ),
    "node_id of another key": (
        lambda e, a, b: forge(a, record_payload(b.fingerprint)),
        "claims node_id '.*' but is signed by",
    ),
    "payload too large": (lambda e, a, b: forge(a, {"blob": b"x" * MAX_PAYLOAD_BYTES}), "over the 65536 limit"),
    "payload with int keys": (
        lambda e, a, b: changed(e, payload={1: 2}),
        "unacceptable payload: dict keys must be str",
    ),
    "payload too deep": (lambda e, a, b: changed(e, payload=nested(MAX_NESTING + 2)), "nested deeper"),
    "payload with ext type": (
        lambda e, a, b: changed(e, payload={"x": msgpack.ExtType(5, b"")}),
        "ExtType is not a msgpack type",
    ),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_forgery_is_refused(envelope, identity, other, name):
    mutate, message = FORGERIES[name]
    with pytest.raises(ForgedRecordError, match=message):
        verify_record(mutate(envelope, identity, other), NOW)


def test_deepest_allowed_payload_verifies(identity):
    assert verify_record(sign_record(identity, nested(MAX_NESTING), EXPIRES, 0), NOW)


def test_owner_mismatch_is_refused(envelope, other):
    with pytest.raises(ForgedRecordError, match=f"not by its owner {other.fingerprint}"):
        verify_record(envelope, NOW, owner=other.fingerprint)


def test_forged_record_error_is_a_value_error():
    assert issubclass(ReplayedRecordError, ForgedRecordError)
    assert issubclass(ForgedRecordError, ValueError)


# --- replays


def test_replay_guard_refuses_older_sequences(identity, other):
    guard = ReplayGuard()
    payload = record_payload(identity.fingerprint)
    for sequence in (5, 5, 6):
        guard.verify(sign_record(identity, payload, EXPIRES, sequence), NOW)
    with pytest.raises(ReplayedRecordError, match="sequence 5 .* older than accepted 6"):
        guard.verify(sign_record(identity, payload, EXPIRES, 5), NOW)
    guard.verify(sign_record(other, record_payload(other.fingerprint), EXPIRES, 1), NOW)  # keys are independent
    assert len(guard) == 2


def test_replay_guard_ignores_forgeries(envelope, identity):
    guard = ReplayGuard()
    with pytest.raises(ForgedRecordError):
        guard.verify(changed(envelope, sequence=10**9), NOW)
    assert len(guard) == 0
    guard.verify(envelope, NOW)


def test_replay_guard_forgets_least_recently_seen():
    guard = ReplayGuard(max_keys=3)
    identities = [NodeIdentity.generate() for _ in range(5)]
    for identity in identities[:3]:
        guard.verify(sign_record(identity, {}, EXPIRES, 10), NOW)
    guard.verify(sign_record(identities[0], {}, EXPIRES, 10), NOW)  # seen again: now the most recent
    for identity in identities[3:]:
        guard.verify(sign_record(identity, {}, EXPIRES, 10), NOW)
    assert len(guard) == 3
    with pytest.raises(ReplayedRecordError):
        guard.verify(sign_record(identities[0], {}, EXPIRES, 9), NOW)
    guard.verify(sign_record(identities[1], {}, EXPIRES, 9), NOW)  # forgotten


def test_replay_guard_is_thread_safe(identity):
    guard = ReplayGuard(max_keys=4)
    envelopes = [sign_record(identity, {}, EXPIRES, sequence) for sequence in range(50)]
    strangers = [sign_record(NodeIdentity.generate(), {}, EXPIRES, 0) for _ in range(20)]
    errors: list[Exception] = []

    def worker(seed: int) -> None:
        order = random.Random(seed).sample(envelopes + strangers, len(envelopes) + len(strangers))
        for envelope in order:
            try:
                guard.verify(envelope, NOW)
            except ReplayedRecordError:
                pass
            except Exception as error:  # noqa: BLE001 - anything else is a bug
                errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(guard) <= 4
    guard.verify(envelopes[-1], NOW)
    with pytest.raises(ReplayedRecordError):
        guard.verify(envelopes[-2], NOW)


def test_replay_guard_needs_room():
    with pytest.raises(ValueError):
        ReplayGuard(max_keys=0)


# --- random mutations


def _random_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            0,
            -1,
            2**63,
            1.5,
            math.inf,
            "",
            "x" * rng.randrange(40),
            b"",
            rng.randbytes(rng.randrange(70)),
            [],
            {},
            [b"\0"],
            {"k": 1},
        ]
    )


def _mutate_bytes(value: bytes, rng: random.Random) -> bytes:
    if value and rng.random() < 0.8:
        return flip(value, rng.randrange(len(value)))
    return value[: rng.randrange(len(value) + 1)] + rng.randbytes(rng.randrange(3))


def _mutate_payload(payload: dict, rng: random.Random) -> dict:
    payload = copy.deepcopy(payload)
    key = rng.choice(sorted(payload))
    action = rng.randrange(4)
    if action == 0:
        del payload[key]
    elif action == 1:
        payload[key] = _random_value(rng)
    elif action == 2:
        payload[f"{key}_"] = payload[key]
    elif isinstance(payload[key], str) and payload[key]:
        payload[key] = _mutate_bytes(payload[key].encode(), rng).decode(errors="replace")
    else:
        payload[key] = [payload[key]]
    return payload


def _mutate_encoding(envelope: dict, rng: random.Random) -> Any:
    data = _mutate_bytes(MSGPackSerializer.dumps(envelope), rng)
    try:
        return MSGPackSerializer.loads(data)
    except Exception:  # noqa: BLE001 - undecodable bytes never reach verify_record
        return envelope


def _mutate(envelope: dict, rng: random.Random) -> Any:
    kind = rng.randrange(6)
    if kind == 0:
        field = rng.choice(["signature", "public_key"])
        return changed(envelope, **{field: _mutate_bytes(envelope[field], rng)})
    if kind == 1:
        return changed(envelope, payload=_mutate_payload(envelope["payload"], rng))
    if kind == 2:
        return {key: value for key, value in envelope.items() if key != rng.choice(sorted(envelope))}
    if kind == 3:
        return changed(envelope, **{rng.choice(sorted(envelope)): _random_value(rng)})
    if kind == 4:
        return changed(
            envelope,
            expires_at=envelope["expires_at"] + rng.choice([-1e-6, 1.0, -600.0]),
            sequence=envelope["sequence"] + rng.choice([0, 1]),
        )
    return _mutate_encoding(envelope, rng)


def test_random_mutations_are_always_forged_record_errors(envelope):
    rng = random.Random(20240601)
    tried = 0
    for _ in range(500):
        mutated = _mutate(envelope, rng)
        if mutated == envelope:
            continue
        tried += 1
        with pytest.raises(ForgedRecordError):
            verify_record(mutated, NOW)
    assert tried >= 400
