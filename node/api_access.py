"""Who may use a node's APIs and how much: named API clients (principals), each with its token and limits.

Both APIs of a node, the gRPC SwarmAPI (node.api_service) and the OpenAI-compatible HTTP API
(node.openai_http), admit every request through one `ApiAccess`, so a client's limits hold across both:

- A request that bears the token of a configured client is that client's: the principal
  `Principal.api_client(node_id, name)`, limited by the client's own limits.
- Any other request is anonymous (principal None), limited per IP address (per /64 network for IPv6)
  with the node's default limits. When clients are configured it is then refused as unauthenticated;
  the attempt has counted against its address, so guessing tokens is rate-limited too.

Limits (`ClientLimits`) are a request rate (a token bucket: `burst` requests at once, then
`requests_per_second`) and a budget of generated tokens (`tokens_per_minute`: a bucket of that size that
refills over a minute). A request that may generate up to N tokens starts only when the budget holds N
(or is full, when N is more than the whole budget); the tokens it generates are charged as they come,
so a budget can go into debt, which later requests wait out. Each refusal says when to retry.

The tokens file (`swarm-node join --api-tokens FILE`) is JSON. It holds no secret, only the SHA-256 of
each token (`printf %s "$TOKEN" | sha256sum`):

    {"clients": [
        {"name": "alice", "token_sha256": "<64 hex digits>", "requests_per_second": 5, "burst": 10,
         "tokens_per_minute": 3000},
        {"name": "bob", "token_sha256": "<64 hex digits>"}
    ]}

Omitted limits are the node's defaults (`--api-rate`, `--api-tokens-per-minute`); `"tokens_per_minute":
null` is no token budget.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeswarm.node.rate_limit import RateLimiter
from edgeswarm.protocol.principals import Principal

DEFAULT_REQUESTS_PER_SECOND = 20.0
BURST_SECONDS = 2.0  # a default burst is this many seconds' worth of requests
DEFAULT_TOKENS_PER_MINUTE = 6000.0
DEFAULT_CLIENT_NAME = "default"  # the API client of --api-token
MAX_ANONYMOUS_ADDRESSES = 10_000  # addresses with buckets; the least recently seen is forgotten first
IPV6_PREFIX_BITS = 64  # anonymous IPv6 clients are limited per network of this size (one host's usual share)
SECONDS_PER_MINUTE = 60.0
CLIENT_FIELDS = frozenset({"name", "token_sha256", "requests_per_second", "burst", "tokens_per_minute"})
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ClientLimits:
    """How much one API client may use: requests (a bucket of `burst`, refilled at `requests_per_second`)
    and generated tokens per minute (None: no budget)."""

    requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND
    burst: float = DEFAULT_REQUESTS_PER_SECOND * BURST_SECONDS
    tokens_per_minute: float | None = DEFAULT_TOKENS_PER_MINUTE

    def __post_init__(self) -> None:
        if not (self.requests_per_second > 0 and self.burst >= 1):
            raise ValueError("requests_per_second must be positive and burst at least 1")
        if self.tokens_per_minute is not None and not self.tokens_per_minute >= 1:
            raise ValueError("tokens_per_minute must be at least 1 (or null: no budget)")

    @classmethod
    def per_second(cls, requests_per_second: float, tokens_per_minute: float | None = DEFAULT_TOKENS_PER_MINUTE) -> ClientLimits:
        """Limits with the default burst for this rate."""
        return cls(requests_per_second, max(1.0, BURST_SECONDS * requests_per_second), tokens_per_minute)


@dataclass(frozen=True)
class ApiClient:
    """A named client of the APIs, known by the SHA-256 (hex) of its token."""

    name: str
    token_sha256: str
    limits: ClientLimits = field(default_factory=ClientLimits)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"API client name {self.name!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
        if not _SHA256_HEX.match(self.token_sha256):
            raise ValueError(f"API client {self.name!r}: token_sha256 must be 64 lowercase hex digits")

    @classmethod
    def with_token(cls, name: str, token: str, limits: ClientLimits) -> ApiClient:
        return cls(name, token_digest(token), limits)


def token_digest(token: str) -> str:
    """The SHA-256 of a token, as hex: how the tokens file names it."""
    return hashlib.sha256(token.encode()).hexdigest()


class AccessRefused(Exception):
    """A request the APIs refuse before doing any work (`Unauthenticated` or `RateLimited`)."""


class Unauthenticated(AccessRefused):
    """No token, or one of no configured client."""


class RateLimited(AccessRefused):
    """Over the request rate or the token budget; `retry_after`: whole seconds to wait."""

    def __init__(self, message: str, wait_seconds: float):
        self.retry_after = max(1, math.ceil(wait_seconds))
        super().__init__(f"{message}: retry in {self.retry_after} s")


@dataclass(frozen=True)
class _Buckets:
    """The request bucket and the token budget (None: no budget) of one client, or of all anonymous
    clients (then keyed by address)."""

    limits: ClientLimits
    requests: RateLimiter
    tokens: RateLimiter | None

    @classmethod
    def of(cls, limits: ClientLimits, max_keys: int, clock: Callable[[], float]) -> _Buckets:
        budget = limits.tokens_per_minute
        tokens = RateLimiter(budget / SECONDS_PER_MINUTE, budget, max_keys, clock) if budget is not None else None
        return cls(limits, RateLimiter(limits.requests_per_second, limits.burst, max_keys, clock), tokens)


@dataclass(frozen=True)
class Caller:
    """An admitted request's client: its principal (None when anonymous) and its buckets."""

    principal: Principal | None
    description: str  # who, in refusals: "API client 'alice'" or "anonymous client 10.0.0.7"
    _buckets: _Buckets = field(repr=False)
    _key: Hashable = field(repr=False)

    @property
    def limits(self) -> ClientLimits:
        return self._buckets.limits

    def check_tokens(self, max_tokens: int) -> None:
        """Raises RateLimited unless the token budget holds `max_tokens` (or is full) now."""
        budget = self._buckets.tokens
        if budget is None:
            return
        wait = budget.wait_for(self._key, min(float(max_tokens), budget.burst))
        if wait > 0:
            raise RateLimited(
                f"{self.description} has used its budget of {self.limits.tokens_per_minute:g} generated tokens per "
                f"minute (this request may generate up to {max_tokens})", wait
            )

    def charge(self, tokens: int) -> None:
        """Counts `tokens` generated for this client against its budget."""
        if self._buckets.tokens is not None and tokens > 0:
            self._buckets.tokens.charge(self._key, tokens)

    def _count_request(self) -> None:
        wait = self._buckets.requests.acquire(self._key)
        if wait > 0:
            raise RateLimited(
                f"{self.description} is over its limit of {self.limits.requests_per_second:g} requests per second "
                f"(bursts of {self.limits.burst:g})", wait
            )


class ApiAccess:
    """Admits API requests of the node `node_id`: its `clients`, and anonymous ones per address with
    `default_limits` (refused as unauthenticated once clients are configured). `clock`: seconds, for the buckets."""

    def __init__(
        self,
        node_id: str,
        clients: Sequence[ApiClient] = (),
        default_limits: ClientLimits = ClientLimits(),
        clock: Callable[[], float] = time.monotonic,
    ):
        names = [client.name for client in clients]
        if len(set(names)) < len(names):
            raise ValueError(f"API client names must be unique: {sorted(names)}")
        if len({client.token_sha256 for client in clients}) < len(clients):
            raise ValueError("two API clients have the same token")
        self.node_id = node_id
        self.default_limits = default_limits
        self._clients = {client.token_sha256: (client, _Buckets.of(client.limits, 1, clock)) for client in clients}
        self._anonymous = _Buckets.of(default_limits, MAX_ANONYMOUS_ADDRESSES, clock)

    @property
    def token_required(self) -> bool:
        """Whether only configured clients are served."""
        return bool(self._clients)

    def admit(self, token: str | None, address: str) -> Caller:
        """The caller of a request bearing `token` (None or "": none) from IP `address`, its request counted.

        Raises RateLimited past the caller's request rate, then Unauthenticated for a missing or unknown
        token when clients are configured."""
        known = self._clients.get(token_digest(token)) if token else None
        if known is not None:
            client, buckets = known
            principal = Principal.api_client(self.node_id, client.name)
            caller = Caller(principal, f"API client {client.name!r}", buckets, client.name)
            caller._count_request()
            return caller
        key = _address_key(address)
        caller = Caller(None, f"anonymous client {key}", self._anonymous, key)
        caller._count_request()
        if self.token_required:
            raise Unauthenticated("the API token is not valid" if token else "an API token is needed: send the header `Authorization: Bearer <token>`")
        return caller


def _address_key(address: str) -> str:
    """The bucket key of an anonymous client: its IPv4 address, or its IPv6 /64 network."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX_BITS}", strict=False))
    return str(ip)


# --- configuration -------------------------------------------------------------------------------


def api_access(node_id: str, tokens_file: str | None, api_token: str | None, default_limits: ClientLimits) -> ApiAccess:
    """The access of a node's APIs as `swarm-node join` configures it: the clients of `tokens_file`, and
    `api_token` as the client named "default" (with the default limits)."""
    clients = load_api_clients(tokens_file, default_limits) if tokens_file else []
    if api_token:
        clients.append(ApiClient.with_token(DEFAULT_CLIENT_NAME, api_token, default_limits))
    return ApiAccess(node_id, clients, default_limits)


def load_api_clients(path: str | Path, defaults: ClientLimits) -> list[ApiClient]:
    """The clients of a tokens file (format in the module docstring); ValueError naming what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"API tokens file {path}: {error}") from error
    if not isinstance(data, dict) or set(data) != {"clients"} or not isinstance(data["clients"], list):
        raise ValueError(f'API tokens file {path}: expected {{"clients": [{{"name": ..., "token_sha256": ...}}, ...]}}')
    clients = []
    for index, entry in enumerate(data["clients"]):
        try:
            clients.append(_client(entry, defaults))
        except ValueError as error:
            raise ValueError(f"API tokens file {path}, clients[{index}]: {error}") from None
    return clients


def _client(entry: Any, defaults: ClientLimits) -> ApiClient:
    if not isinstance(entry, dict):
        raise ValueError("each client must be an object")
    unknown = set(entry) - CLIENT_FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; the fields are {sorted(CLIENT_FIELDS)}")
    name, digest = entry.get("name"), entry.get("token_sha256")
    if not isinstance(name, str) or not isinstance(digest, str):
        raise ValueError("'name' and 'token_sha256' are required strings")
    rate = _number(entry, "requests_per_second", defaults.requests_per_second)
    burst = _number(entry, "burst", max(1.0, BURST_SECONDS * rate) if "requests_per_second" in entry else defaults.burst)
    tokens = entry.get("tokens_per_minute", defaults.tokens_per_minute)
    tokens = None if tokens is None else _number(entry, "tokens_per_minute", tokens)
    return ApiClient(name, digest.lower(), ClientLimits(rate, burst, tokens))


def _number(entry: dict, key: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key!r} must be a positive number")
    return float(value)
