"""Signed envelopes for DHT values: who announced a record, until when, and which of its records is newest.

An envelope is a msgpack-able dict:
    {"payload": dict, "public_key": 32 bytes, "expires_at": float, "sequence": int, "signature": 64 bytes}
The signature is Ed25519 (protocol.identity) over `record_message`: the canonical msgpack encoding (dict keys
sorted recursively, tuples as lists) of [RECORD_DOMAIN, payload, public_key, expires_at, sequence].

A node's id IS its key fingerprint (`protocol.identity.fingerprint_of_key`): `verify_record` returns the
fingerprint of the signing key and refuses a payload whose "node_id" is anything else, so a node can
announce only under its own id.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import msgpack

from edgeswarm.protocol.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeIdentity,
    fingerprint_of_key,
    verify,
)

RECORD_DOMAIN = "edgeswarm.v1.record"
MAX_PAYLOAD_BYTES = 64 * 1024  # of the payload's canonical encoding
DEFAULT_MAX_TTL = 3600.0  # seconds a record may claim to stay valid
MAX_NESTING = 32
MAX_SEQUENCE = 2**63 - 1
FIELD_TYPES: dict[str, type] = {
    "payload": dict,
    "public_key": bytes,
    "expires_at": float,
    "sequence": int,
    "signature": bytes,
}
_FIELD_LENGTHS = {"public_key": PUBLIC_KEY_BYTES, "signature": SIGNATURE_BYTES}
_SCALAR_TYPES = (type(None), bool, float, str, bytes)
_MSGPACK_INTS = (-(2**63), 2**64 - 1)


class ForgedRecordError(ValueError):
    """An envelope that is malformed, not signed by its key, outside its lifetime, or not from whom it claims."""


class ReplayedRecordError(ForgedRecordError):
    """An authentic envelope older than one already accepted from the same key."""


def canonical(value: Any, depth: int = 0) -> Any:
    """`value` rebuilt with dict keys sorted and tuples as lists; TypeError/ValueError for anything msgpack lacks."""
    if depth > MAX_NESTING:
        raise ValueError(f"nested deeper than {MAX_NESTING} levels")
    kind = type(value)
    if kind in _SCALAR_TYPES:
        return value
    if kind is int:
        if not _MSGPACK_INTS[0] <= value <= _MSGPACK_INTS[1]:
            raise ValueError(f"integer {value} does not fit msgpack")
        return value
    if kind in (list, tuple):
        return [canonical(item, depth + 1) for item in value]
    if kind is dict:
        if any(type(key) is not str for key in value):
            raise TypeError("dict keys must be str")
        return {key: canonical(value[key], depth + 1) for key in sorted(value)}
    raise TypeError(f"a {kind.__name__} is not a msgpack type")


def record_message(payload: dict, public_key: bytes, expires_at: float, sequence: int) -> bytes:
    """The exact bytes an envelope's signature covers."""
    return msgpack.packb([RECORD_DOMAIN, canonical(payload), public_key, expires_at, sequence], use_bin_type=True)


def sign_record(identity: NodeIdentity, payload: dict, expires_at: float, sequence: int) -> dict[str, Any]:
    """An envelope of `payload`, valid until `expires_at` (seconds since the epoch).

    `sequence` must grow with every new record this identity signs, across restarts too (e.g. milliseconds
    since the epoch): receivers with a ReplayGuard drop lower ones. Raises TypeError/ValueError for a payload
    msgpack cannot carry, over MAX_PAYLOAD_BYTES, or whose "node_id" is not this identity's fingerprint.
    """
    if type(payload) is not dict:
        raise TypeError(f"payload is {type(payload).__name__}, not dict")
    payload = canonical(payload)
    _check_payload_size(payload)
    if payload.get("node_id", identity.fingerprint) != identity.fingerprint:
        raise ValueError(f"payload node_id {payload['node_id']!r} is not this identity's {identity.fingerprint}")
    expires_at = float(expires_at) if type(expires_at) is int else expires_at
    for name, value in (("expires_at", expires_at), ("sequence", sequence)):
        problem = _field_problem(name, value)
        if problem:
            raise ValueError(problem)
    message = record_message(payload, identity.public_key_bytes, expires_at, sequence)
    return {
        "payload": payload,
        "public_key": identity.public_key_bytes,
        "expires_at": expires_at,
        "sequence": sequence,
        "signature": identity.sign(message),
    }


def verify_record(
    envelope: Any, now: float, owner: str | None = None, *, max_ttl: float = DEFAULT_MAX_TTL
) -> tuple[dict, str]:
    """(payload, signer's fingerprint) of an authentic envelope valid at `now`; else ForgedRecordError.

    With `owner`, the signer's fingerprint must also equal it.
    """
    _check_shape(envelope)
    payload, public_key = envelope["payload"], envelope["public_key"]
    try:
        _check_payload_size(canonical(payload))
    except (TypeError, ValueError) as error:
        raise ForgedRecordError(f"unacceptable payload: {error}") from error
    message = record_message(payload, public_key, envelope["expires_at"], envelope["sequence"])
    if not verify(public_key, message, envelope["signature"]):
        raise ForgedRecordError("bad signature: the record was changed after signing or signed by another key")
    _check_lifetime(envelope["expires_at"], now, max_ttl)
    fingerprint = fingerprint_of_key(public_key)
    if owner is not None and fingerprint != owner:
        raise ForgedRecordError(f"record is signed by {fingerprint}, not by its owner {owner}")
    if payload.get("node_id", fingerprint) != fingerprint:
        raise ForgedRecordError(f"payload claims node_id {payload['node_id']!r} but is signed by {fingerprint}")
    return payload, fingerprint


class ReplayGuard:
    """Refuses a record older than one already accepted from the same key.

    Remembers the newest (sequence, expires_at) per fingerprint for at most `max_keys` fingerprints,
    forgetting the least recently seen first (keys cost nothing to make, so a flood of them can make it
    forget; expiry still bounds how long an old record can be replayed). Thread-safe.
    """

    def __init__(self, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._max_keys = max_keys
        self._newest: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._newest)

    def verify(
        self, envelope: Any, now: float, owner: str | None = None, *, max_ttl: float = DEFAULT_MAX_TTL
    ) -> tuple[dict, str]:
        """`verify_record`, then ReplayedRecordError if its sequence is below the newest accepted from its key."""
        payload, fingerprint = verify_record(envelope, now, owner, max_ttl=max_ttl)
        self._admit(fingerprint, (envelope["sequence"], envelope["expires_at"]))
        return payload, fingerprint

    def _admit(self, fingerprint: str, version: tuple[int, float]) -> None:
        with self._lock:
            newest = self._newest.get(fingerprint, version)
            if version[0] < newest[0]:
                raise ReplayedRecordError(
                    f"replayed record: sequence {version[0]} from {fingerprint} is older than accepted {newest[0]}"
                )
            self._newest[fingerprint] = max(version, newest)
            self._newest.move_to_end(fingerprint)
            if len(self._newest) > self._max_keys:
                self._newest.popitem(last=False)


def _check_shape(envelope: Any) -> None:
    if type(envelope) is not dict:
        raise ForgedRecordError(f"envelope is {type(envelope).__name__}, not dict")
    missing, extra = FIELD_TYPES.keys() - envelope.keys(), envelope.keys() - FIELD_TYPES.keys()
    if missing:
        raise ForgedRecordError(f"envelope lacks {', '.join(sorted(missing))}")
    if extra:
        raise ForgedRecordError(f"envelope has unexpected fields {', '.join(sorted(map(repr, extra)))}")
    for name, value in envelope.items():
        problem = _field_problem(name, value)
        if problem:
            raise ForgedRecordError(problem)


def _field_problem(name: str, value: Any) -> str | None:
    """What is wrong with an envelope field's value, if anything (the payload's content aside)."""
    expected = FIELD_TYPES[name]
    if type(value) is not expected:  # exact: a bool is no sequence here
        return f"{name} is {type(value).__name__}, not {expected.__name__}"
    if name in _FIELD_LENGTHS and len(value) != _FIELD_LENGTHS[name]:
        return f"{name} is {len(value)} bytes, not {_FIELD_LENGTHS[name]}"
    if name == "sequence" and not 0 <= value <= MAX_SEQUENCE:
        return f"sequence {value} is outside [0, 2**63)"
    if name == "expires_at" and not math.isfinite(value):
        return f"expires_at {value} is not finite"
    return None


def _check_payload_size(payload: dict) -> None:
    size = len(msgpack.packb(payload, use_bin_type=True))
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload encodes to {size} bytes, over the {MAX_PAYLOAD_BYTES} limit")


def _check_lifetime(expires_at: float, now: float, max_ttl: float) -> None:
    if expires_at < now:
        raise ForgedRecordError(f"record expired {now - expires_at:.1f} s ago")
    if expires_at > now + max_ttl:
        raise ForgedRecordError(f"record expires {expires_at - now:.1f} s from now, beyond the {max_ttl:.0f} s limit")
