"""Memory access tokens: an owner's signed permission to read and/or write one of its memory namespaces.

A memory namespace belongs to a principal (protocol.principals) and is known to the swarm by its storage
id, a keyed hash of (owner, name). A token says: the owner `owner` lets the holder `rights` ("read",
"write") on the namespace `storage_id` until `expires_at`, and, if `grantee` is set, only the principal
`grantee`. It is signed (Ed25519, protocol.identity) by the owner's key: the key whose fingerprint is the
owner's `Principal.key_id` (for an API client `<node id>/api:<name>`, the key of that node).

A grant names a grantee. Since the grantee's agent runs reach memory through a coordinator node, not
directly, a grantee passes its grant on by *delegating* it: it signs a token of its own that embeds the
grant as `parent`, for the same namespace, with no more rights than the grant. A delegation is valid when
its signer is the grant's grantee; chains are one grant deep.

Wire format: base64url (unpadded) of msgpack [body, signature], where body is the msgpack of
[VERSION, owner, storage_id, rights, expires_at, grantee, public_key, parent token bytes or b""] and the
signature covers ACCESS_DOMAIN + body exactly as sent, so no re-encoding is ever needed to verify.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterable
from dataclasses import dataclass

import msgpack

from edgeswarm.protocol.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeIdentity,
    fingerprint_of_key,
    verify,
)
from edgeswarm.protocol.principals import Principal

READ = "read"
WRITE = "write"
RIGHTS = (READ, WRITE)
VERSION = 1
ACCESS_DOMAIN = b"edgeswarm.v1.memory-access\x00"
MAX_TOKEN_CHARS = 2048  # a delegation embeds its grant, so this covers two tokens
MAX_ID_CHARS = 256  # of an owner, grantee or storage id
MAX_EXPIRY = 2**40  # seconds since the epoch: far beyond any real expiry, well inside msgpack's ints


class MemoryAccessError(PermissionError):
    """A token that is malformed, forged, expired, or does not allow the access asked for; says why."""


@dataclass(frozen=True)
class MemoryAccess:
    """A token whose signatures hold (see `read_access`); what it allows is checked by `check_access`."""

    owner: str
    storage_id: str
    rights: frozenset[str]
    expires_at: int
    grantee: str  # "" for a bearer token: whoever holds it
    signer: str  # fingerprint of the key that signed it
    parent: MemoryAccess | None = None  # the grant this token delegates


def issue_access(
    identity: NodeIdentity,
    owner: str,
    storage_id: str,
    rights: Iterable[str],
    ttl: float,
    grantee: str = "",
    parent: str | None = None,
    now: float | None = None,
) -> str:
    """A token signed by `identity` that lets `grantee` (anyone, if "") use `rights` on the namespace for
    `ttl` seconds. `identity` must be the owner's key, or, with `parent` (a grant), the grantee's key."""
    rights = sorted(set(rights))
    if not rights or not set(rights) <= set(RIGHTS):
        raise ValueError(f"rights must be a non-empty subset of {RIGHTS}, got {rights}")
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, got {ttl!r}")
    for name, value in (("owner", owner), ("storage_id", storage_id), ("grantee", grantee)):
        if not isinstance(value, str) or len(value) > MAX_ID_CHARS or (name != "grantee" and not value):
            raise ValueError(f"{name} must be a string of 1 to {MAX_ID_CHARS} characters")
    expires_at = int((time.time() if now is None else now) + ttl)
    parent_bytes = b"" if parent is None else _decode_text(parent)
    body = msgpack.packb(
        [VERSION, owner, storage_id, rights, expires_at, grantee, identity.public_key_bytes, parent_bytes], use_bin_type=True
    )
    token = msgpack.packb([body, identity.sign(ACCESS_DOMAIN + body)], use_bin_type=True)
    return base64.urlsafe_b64encode(token).decode("ascii").rstrip("=")


def read_access(token: str) -> MemoryAccess:
    """Parses a token and checks its signatures (and its parent's); raises MemoryAccessError."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise MemoryAccessError(f"a memory access token is a string of at most {MAX_TOKEN_CHARS} characters")
    return _parse(_decode_text(token), depth=0)


def check_access(token: str, owner: str, storage_id: str, right: str, caller: str | None, now: float | None = None) -> MemoryAccess:
    """The token if it lets `caller` (a principal id; None when unknown) use `right` on the namespace
    `storage_id` of `owner` now; MemoryAccessError saying why not otherwise."""
    now = time.time() if now is None else now
    access = read_access(token)
    _check_scope(access, owner, storage_id, right, now, "token")
    if access.grantee and access.grantee != caller:
        raise MemoryAccessError(f"the memory access token is granted to {access.grantee}, not to {caller or 'an anonymous caller'}")
    grant = access.parent
    if grant is None:
        _check_signed_by_owner(access, owner, "token")
        return access
    _check_scope(grant, owner, storage_id, right, now, "grant")
    _check_signed_by_owner(grant, owner, "grant")
    if not grant.grantee or Principal(grant.grantee).key_id != access.signer:
        raise MemoryAccessError(f"a delegated memory token must be signed by its grant's grantee ({grant.grantee or 'none'}), not {access.signer}")
    if not access.rights <= grant.rights:
        raise MemoryAccessError(f"a delegated memory token asks for {sorted(access.rights)} but its grant gives {sorted(grant.rights)}")
    return access


def _check_scope(access: MemoryAccess, owner: str, storage_id: str, right: str, now: float, what: str) -> None:
    if access.owner != owner or access.storage_id != storage_id:
        raise MemoryAccessError(f"the memory access {what} is for another namespace")
    if right not in access.rights:
        raise MemoryAccessError(f"the memory access {what} does not give the right to {right}")
    if access.expires_at <= now:
        raise MemoryAccessError(f"the memory access {what} expired {now - access.expires_at:.0f} s ago")


def _check_signed_by_owner(access: MemoryAccess, owner: str, what: str) -> None:
    if access.signer != Principal(owner).key_id:
        raise MemoryAccessError(f"the memory access {what} is signed by {access.signer}, not by the owner {owner}'s key")


def _decode_text(token: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError) as error:
        raise MemoryAccessError(f"a memory access token is base64url: {error}") from error


def _unpack(raw: bytes) -> object:
    try:
        return msgpack.unpackb(raw, raw=False, use_list=True, max_bin_len=MAX_TOKEN_CHARS, max_str_len=MAX_TOKEN_CHARS,
                               max_array_len=16, max_map_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise MemoryAccessError(f"malformed memory access token: {error!r}") from error


def _parse(raw: bytes, depth: int) -> MemoryAccess:
    envelope = _unpack(raw)
    if not (isinstance(envelope, list) and len(envelope) == 2 and all(isinstance(part, bytes) for part in envelope)):
        raise MemoryAccessError("malformed memory access token: expected [body, signature]")
    body, signature = envelope
    fields = _unpack(body)
    if not (isinstance(fields, list) and len(fields) == 8):
        raise MemoryAccessError("malformed memory access token: the body has the wrong shape")
    version, owner, storage_id, rights, expires_at, grantee, public_key, parent = fields
    if version != VERSION:
        raise MemoryAccessError(f"memory access token version {version!r}; this node reads version {VERSION}")
    if not all(isinstance(value, str) and len(value) <= MAX_ID_CHARS for value in (owner, storage_id, grantee)) or not owner:
        raise MemoryAccessError("malformed memory access token: bad owner, storage id or grantee")
    if not (isinstance(rights, list) and rights and all(right in RIGHTS for right in rights)):
        raise MemoryAccessError(f"malformed memory access token: rights must be among {RIGHTS}")
    if type(expires_at) is not int or not 0 <= expires_at <= MAX_EXPIRY:
        raise MemoryAccessError("malformed memory access token: bad expiry")
    if not (isinstance(public_key, bytes) and len(public_key) == PUBLIC_KEY_BYTES and len(signature) == SIGNATURE_BYTES):
        raise MemoryAccessError("malformed memory access token: bad key or signature size")
    if not isinstance(parent, bytes):
        raise MemoryAccessError("malformed memory access token: bad parent")
    if not verify(public_key, ACCESS_DOMAIN + body, signature):
        raise MemoryAccessError("the memory access token's signature does not hold")
    if parent and depth > 0:
        raise MemoryAccessError("a memory grant can be delegated once, not further")
    return MemoryAccess(
        owner=owner,
        storage_id=storage_id,
        rights=frozenset(rights),
        expires_at=expires_at,
        grantee=grantee,
        signer=fingerprint_of_key(public_key),
        parent=_parse(parent, depth + 1) if parent else None,
    )
