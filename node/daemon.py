"""`swarm-node join`: load a span, serve it over gRPC, keep it announced in the DHT until told to stop."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import grpc
import psutil
from hivemind.utils import get_dht_time

from edgeswarm.agent.sandbox import SandboxUnavailableError
from edgeswarm.agent.tools import check_allowed_tools
from edgeswarm.model.calibration import load_or_fit_basis
from edgeswarm.model.profiling import (
    blocks_that_fit,
    measure_decode_throughput,
    measure_prefill_throughput,
)
from edgeswarm.model.semantic_basis import load_basis
from edgeswarm.model.sources import ModelSource, open_model
from edgeswarm.model.span import TransformerSpan
from edgeswarm.node.agent_services import AgentServices
from edgeswarm.node.api_access import ApiAccess, ClientLimits, api_access
from edgeswarm.node.api_service import SwarmApiServicer, start_api_server
from edgeswarm.node.config import AgentConfig, NetworkConfig, NodeSettings
from edgeswarm.node.forwarding import PeerDirectory, Pusher
from edgeswarm.node.openai_http import OpenAIServer
from edgeswarm.node.plan_coordination import planned_span
from edgeswarm.node.service import BlockServicer, start_grpc_server
from edgeswarm.partition.rebalancing import choose_move
from edgeswarm.partition.span_selection import (
    SpanClaim,
    choose_least_covered_span,
    claims_key,
    settle_claim,
)
from edgeswarm.protocol.call_auth import CallAuthenticator
from edgeswarm.protocol.channels import use_identity, use_swarm_key
from edgeswarm.protocol.constants import REFRESHES_PER_TTL
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.protocol.swarm_key import read_swarm_key
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm.dht import RecordAuth
from edgeswarm.swarm.links import measure_link
from edgeswarm.swarm.mdns import WILDCARD_HOST, LanPresence, discover_peers, lan_address
from edgeswarm.swarm.membership import MemberAnnouncer, MemberDirectory
from edgeswarm.swarm.policy import SessionPolicy

logger = logging.getLogger(__name__)

READY_PREFIX = "EDGESWARM_READY "

# Claiming a span before loading it (partition.span_selection): nodes started at the same moment would
# otherwise all take the first blocks. A node advertises itself over mDNS as soon as its DHT is up. Then,
# in each round, once the LAN peers it has seen are joined (LAN_JOIN_WAIT at most: nodes that found no
# one when they started each bootstrap a DHT of their own, merged through mDNS), it waits up to
# CLAIM_JITTER seconds at random (so that simultaneous starts read and claim one after another), reads
# the records and claims, and claims the least-covered window; CLAIM_SETTLE seconds later the next round
# re-reads them. Two nodes whose DHTs are joined cannot both miss each other's claim as long as
# CLAIM_SETTLE outlasts a read and a store (milliseconds; a second leaves room for a loaded device and
# for a LAN peer's mDNS announcement to arrive). A claim that an earlier one displaced is made again
# elsewhere, up to CLAIM_ROUNDS claims in all. This costs a node CLAIM_SETTLE seconds and about a
# CLAIM_JITTER of start-up, and saves a rebalancing period (a minute by default) after simultaneous starts.
CLAIM_JITTER = 1.0
CLAIM_SETTLE = 1.0
CLAIM_ROUNDS = 4
CLAIM_TTL = 60.0  # seconds a claim keeps others off while its node loads (its announcement replaces it)
LAN_JOIN_WAIT = 15.0


def reachable_host(network: NetworkConfig, initial_peers: Sequence[str]) -> str:
    """The address peers should dial: --announce-host, else the listen host, or for a node listening on
    every interface this device's address towards its peers (swarm.mdns.lan_address)."""
    if network.announce_host:
        return network.announce_host
    host = network.listen_host
    return lan_address(initial_peers) if host == WILDCARD_HOST else host


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in every child this process forks (hivemind's DHT process): the kernel kills the child when
    this process dies, even by SIGKILL, so no orphaned DHT peer (nor its p2pd, which exits with it) is left."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _check_allowed_tools(agents: AgentConfig) -> None:
    """Fails fast (ValueError) when --allow-tools names a tool that cannot be hosted here, e.g. python without bwrap."""
    if not agents.enabled:
        raise ValueError("--allow-tools needs the agent services: drop --no-agents")
    try:
        check_allowed_tools(agents.allow_tools)
    except SandboxUnavailableError as error:
        raise ValueError(f"--allow-tools python: {error}") from error


class SwarmNode:
    """A running node. `start()` returns once it serves and is announced; `stop()` withdraws and shuts down."""

    def __init__(self, settings: NodeSettings):
        self.settings = settings
        placement, network, api = settings.placement, settings.network, settings.api
        self.model: ModelSource = open_model(placement.model)  # fails fast on a bad path or family
        if placement.blocks is not None:
            self.model.check_span(*placement.blocks)
        if api.serving and not settings.agents.enabled:
            raise ValueError("--api-port and --http-port need the agent services: drop --no-agents")
        if settings.agents.allow_tools:
            _check_allowed_tools(settings.agents)
        if placement.num_blocks is not None and not 0 < placement.num_blocks <= self.model.num_blocks:
            raise ValueError(f"--num-blocks must be in [1, {self.model.num_blocks}], got {placement.num_blocks}")
        self.identity = NodeIdentity.load_or_create(network.identity) if network.identity else NodeIdentity.generate()
        self.api_access: ApiAccess = api_access(  # a bad tokens file fails fast
            self.identity.fingerprint,
            api.api_tokens,
            api.api_token,
            ClientLimits.per_second(api.api_rate, api.api_tokens_per_minute),
        )
        self.tls: tuple[bytes, bytes] | None = None  # (certificate PEM, key PEM) with --tls
        self.host = ""  # the address peers dial (reachable_host), set in start() once the initial peers are known
        self.swarm_key = read_swarm_key(network.swarm_key) if network.swarm_key else None
        use_swarm_key(self.swarm_key)  # this node's own calls to its peers carry the swarm's token
        use_identity(self.identity)  # and are signed by its identity
        self._stopped = threading.Event()
        self._record_lock = threading.Lock()  # the announce, rebalance and link threads all update the record
        self.dht = None
        self.server: grpc.Server | None = None
        self.record: ServerRecord | None = None
        self.servicer: BlockServicer | None = None
        self.lan_presence: LanPresence | None = None
        self.agents: AgentServices | None = None
        self.api_server: grpc.Server | None = None
        self.api_servicer: SwarmApiServicer | None = None
        self.api_address = ""
        self.http_server: OpenAIServer | None = None
        self.http_address = ""

    def _max_blocks(self) -> int:
        """The most blocks this node serves: --num-blocks, else what fits in its memory."""
        placement = self.settings.placement
        return placement.num_blocks or blocks_that_fit(self.model.config, quant=placement.quant)

    def _choose_span(self, alone: bool) -> tuple[int, int]:
        """--blocks, else the least-covered window, claimed first (see CLAIM_JITTER) unless this node is
        `alone`: it has no peer and looks for none, so nobody can take the same blocks at the same moment."""
        if self.settings.placement.blocks is not None:
            return self.settings.placement.blocks
        length, num_blocks = self._max_blocks(), self.model.num_blocks
        if alone:
            return choose_least_covered_span([], num_blocks, length)
        node_id, key = self.identity.fingerprint, claims_key(self.model.model_id)
        mine: SpanClaim | None = None
        for _ in range(CLAIM_ROUNDS):
            if self.lan_presence is not None and not self.lan_presence.wait_joined(LAN_JOIN_WAIT):
                logger.warning("claiming blocks before every LAN peer is joined")
            time.sleep(random.uniform(0, CLAIM_JITTER))  # after the joins, which end at the same moment for peers that merge
            records = swarm_dht.fetch_servers(self.dht, self.model.model_id, num_blocks)
            span = settle_claim(records, self._read_claims(), node_id, mine, num_blocks, length)
            if span is None:
                break
            mine = SpanClaim(node_id, *span, claimed_at=get_dht_time())
            swarm_dht.store_subkey(self.dht, key, node_id, mine.to_dict(), CLAIM_TTL)  # unstored, it just holds nobody off
            time.sleep(CLAIM_SETTLE)
        logger.info("claimed blocks %d:%d", *mine.span)
        return mine.span

    def _read_claims(self) -> list[SpanClaim]:
        """The well-formed claims in the DHT, each stored by the node it names."""
        claims = []
        for subkey, value in swarm_dht.fetch_subkeys(self.dht, claims_key(self.model.model_id)).items():
            try:
                claim = SpanClaim.from_dict(value, self.model.num_blocks)
            except ValueError as error:
                logger.warning("ignoring the claim of %s: %s", subkey, error)
                continue
            if claim.node_id == subkey:
                claims.append(claim)
        return claims

    def start(self) -> None:
        placement, network = self.settings.placement, self.settings.network
        if sys.platform == "linux":
            os.register_at_fork(after_in_child=_die_with_parent)
        initial_peers = list(network.initial_peers)
        if not initial_peers and network.mdns:
            initial_peers = discover_peers(network.swarm_id)
            logger.info("mDNS found %d peers of swarm %r", len(initial_peers), network.swarm_id)
        self.host = reachable_host(network, initial_peers)
        self.dht = swarm_dht.start_dht(
            initial_peers,
            host=network.listen_host,
            port=network.dht_port,
            announce_host=self.host,
            announce_maddrs=list(network.announce_maddrs) or None,
            use_relay=network.use_relay,
            use_auto_relay=network.use_auto_relay,
            swarm_key=self.swarm_key,
        )
        swarm_dht.use_auth(self.dht, RecordAuth(self.identity, self.swarm_key))
        self.member_announcer = MemberAnnouncer(self.dht, self.identity.fingerprint, "node")
        node_id = self.identity.fingerprint
        if network.mdns:  # at once, so that LAN peers starting now merge DHTs before anyone claims blocks
            self._advertise_on_lan()
        start, end = self._choose_span(alone=not initial_peers and not network.mdns)
        rss_before = psutil.Process().memory_info().rss
        span = self._load_span(start, end)
        load_rss_growth = psutil.Process().memory_info().rss - rss_before
        throughput = measure_decode_throughput(span)
        prefill_throughput = measure_prefill_throughput(span)
        limits = self.settings.limits.service_limits()
        peers = PeerDirectory(lambda: swarm_dht.fetch_servers(self.dht, self.model.model_id, self.model.num_blocks))
        self.servicer = BlockServicer(span, self.model.model_id, node_id, throughput, limits, load_rss_growth, pusher=Pusher(peers))
        self.tls = self.identity.tls_certificate([self.host]) if network.tls else None
        add_services = (lambda server, port: self._add_agent_services(server, f"{self.host}:{port}")) if self.settings.agents.enabled else None
        self.members = MemberDirectory(self.dht)
        authenticator = CallAuthenticator(node_id, self.members.is_member, self.swarm_key)
        self.server, port = start_grpc_server(self.servicer, network.listen_host, network.port, authenticator, add_services, self.tls)
        self.record = ServerRecord(
            node_id=node_id,
            address=f"{self.host}:{port}",
            model_id=self.model.model_id,
            start_block=start,
            end_block=end,
            throughput=self.servicer.announced_throughput,
            kv_free_bytes=self._kv_free_bytes(),
            prefill_throughput=prefill_throughput,
            max_blocks=self._max_blocks(),
            memory_bytes=psutil.virtual_memory().available,
            partition=placement.partition,
            codecs=tuple(self.servicer.codecs),
            weight_quant=placement.quant,
            tls_cert=self.tls_certificate,
        )
        self._measure_links()
        if not swarm_dht.announce(self.dht, self.record, network.announce_ttl):
            logger.warning("the DHT did not accept the first announcement; retrying in the refresh loop")
        if self.agents is not None:
            self.agents.announce(network.announce_ttl)
            self._start_apis()
        threading.Thread(target=self._refresh_announcement, name="announce", daemon=True).start()
        if placement.blocks is None and placement.rebalance_period > 0:
            threading.Thread(target=self._rebalance, name="rebalance", daemon=True).start()
        if network.semantic_basis != "off":
            threading.Thread(target=self._prepare_semantic_basis, name="semantic-basis", daemon=True).start()

    def _advertise_on_lan(self) -> None:
        """Advertises this node's DHT addresses over mDNS, and joins the LAN peers that appear."""
        network = self.settings.network
        try:
            self.lan_presence = LanPresence(self.identity.fingerprint, network.swarm_id, self.initial_peers, self._join_lan_peers)
        except ValueError as error:  # e.g. a node on loopback only: there is no LAN to advertise on
            logger.info("not advertising over mDNS: %s", error)

    def _add_agent_services(self, server: grpc.Server, address: str) -> None:
        node_id, config = self.identity.fingerprint, self.settings.agents
        data_dir = config.data_dir or os.path.expanduser(f"~/.cache/edgeswarm/nodes/{node_id}")
        self.agents = AgentServices(
            node_id, address, self.model, self.dht, data_dir, config.tools_file, tls_cert=self.tls_certificate,
            swarm_key=self.swarm_key, allow_tools=config.allow_tools,
            session_policy=SessionPolicy(spot_check=config.spot_check),
        )
        self.agents.add_to(server)

    @property
    def tls_certificate(self) -> str:
        """The PEM certificate this node serves TLS with ("" without --tls)."""
        return self.tls[0].decode() if self.tls else ""

    def _start_apis(self) -> None:
        """The SwarmAPI (gRPC) and the OpenAI-compatible HTTP endpoint, as configured."""
        network, api, agents = self.settings.network, self.settings.api, self.agents
        if api.api_port is not None:
            self.api_servicer = SwarmApiServicer(agents.new_swarm_client, self.model, self.dht, agents.directory)
            self.api_server, port = start_api_server(self.api_servicer, network.listen_host, api.api_port, self.api_access, self.tls)
            self.api_address = f"{self.host}:{port}"
        if api.http_port is not None:
            self.http_server = OpenAIServer(
                agents.new_swarm_client,
                network.listen_host,
                api.http_port,
                access=self.api_access,
                tls=self.tls,
            )
            self.http_address = f"{self.host}:{self.http_server.start()}"

    def _prepare_semantic_basis(self) -> None:
        """Loads (or fits and caches) the semantic codec's basis, then offers the codec to clients."""
        try:
            if self.settings.network.semantic_basis == "auto":
                basis = load_or_fit_basis(self.model)
            else:
                basis = load_basis(self.settings.network.semantic_basis)
        except Exception as error:  # the node serves on without the semantic codec
            logger.warning("no semantic codec on this node: %s", error)
            return
        if basis.hidden_size != self.model.config.hidden_size or max(basis.boundaries) != self.model.num_blocks:
            logger.warning("semantic basis %s does not fit model %s; not using it", basis.digest, self.model.model_id)
            return
        self.servicer.semantic_basis = basis
        self._update_record(codecs=tuple(self.servicer.codecs), semantic_basis=basis.digest)
        logger.info("semantic codec ready (basis %s)", basis.digest)

    def _join_lan_peers(self, maddrs: list[str]) -> None:
        """Adds peers that appeared on the LAN to the DHT (merging swarms that bootstrapped apart)."""
        reached = swarm_dht.connect_peers(self.dht, maddrs)
        logger.info("mDNS: %d of %d new LAN peers answered", reached, len(maddrs))

    def _update_record(self, **changes) -> ServerRecord:
        """Changes fields of this node's record atomically and returns the new record."""
        with self._record_lock:
            self.record = replace(self.record, **changes)
            return self.record

    def _load_span(self, start: int, end: int) -> TransformerSpan:
        logger.info("loading blocks %d:%d of %s", start, end, self.model.model_id)
        states = (self.model.block_state(index) for index in range(start, end))
        return TransformerSpan(self.model.config, start, end, states, quant=self.settings.placement.quant)

    def _measure_links(self) -> None:
        """Measures bandwidth and RTT to every announced peer not measured yet, and keeps them in the record."""
        links = dict(self.record.links)
        for record in swarm_dht.fetch_servers(self.dht, self.model.model_id, self.model.num_blocks):
            if record.node_id != self.record.node_id and record.node_id not in links:
                try:
                    links[record.node_id] = list(measure_link(record.address, record.node_id))
                except Exception as error:  # an unreachable peer is simply not measured
                    logger.info("could not measure the link to %s: %r", record.node_id, error)
        self._update_record(links=links)

    def _rebalance(self) -> None:
        """Every period (with jitter, so that nodes do not all move at once), moves if the swarm gains,
        or, with --partition pipeline|ring, to the stage the swarm-wide plan gives this node."""
        placement = self.settings.placement
        while not self._stopped.wait(placement.rebalance_period * random.uniform(0.7, 1.3)):
            try:
                if placement.partition == "auto":
                    records = swarm_dht.fetch_servers(self.dht, self.model.model_id, self.model.num_blocks)
                    target = choose_move(records, self.record, self.model.num_blocks, placement.redundancy)
                else:
                    self._measure_links()
                    target = planned_span(self.dht, self.model, placement, self.record)
                if target is not None and target != (self.record.start_block, self.record.end_block):
                    if not self._stopped.is_set():
                        self.move_to(*target)
            except Exception:  # a failed round must not end rebalancing: the next one retries
                logger.exception("rebalancing round failed")

    def move_to(self, start: int, end: int) -> None:
        """Loads blocks [start, end) and serves them to new sessions; sessions in flight finish on the old ones."""
        began = time.monotonic()
        old = (self.record.start_block, self.record.end_block)
        span = self._load_span(start, end)
        throughput = measure_decode_throughput(span)
        prefill_throughput = measure_prefill_throughput(span)
        self.servicer.replace_span(span, throughput)
        record = self._update_record(
            start_block=start, end_block=end, throughput=self.servicer.announced_throughput, prefill_throughput=prefill_throughput
        )
        swarm_dht.announce(self.dht, record, self.settings.network.announce_ttl)
        logger.info("moved from blocks %d:%d to %d:%d in %.1fs", *old, start, end, time.monotonic() - began)
        print(f"moved from blocks {old[0]}:{old[1]} to {start}:{end}", flush=True)

    def _kv_free_bytes(self) -> int:
        return self.servicer.kv_budget.free_bytes

    def _refresh_announcement(self) -> None:
        ttl = self.settings.network.announce_ttl
        while not self._stopped.wait(ttl / REFRESHES_PER_TTL):
            record = self._update_record(kv_free_bytes=self._kv_free_bytes())
            swarm_dht.announce(self.dht, record, ttl)  # a failure is retried next round
            if self.agents is not None:
                self.agents.announce(ttl)

    @property
    def initial_peers(self) -> list[str]:
        """Multiaddrs that other nodes and clients pass as --initial-peers to join through this node."""
        return swarm_dht.visible_maddrs(self.dht)

    def ready_line(self) -> str:
        """A machine-readable line saying where this node is and what it serves."""
        info = {
            "node_id": self.record.node_id,
            "address": self.record.address,
            "model_id": self.record.model_id,
            "blocks": [self.record.start_block, self.record.end_block],
            "throughput": round(self.record.throughput, 2),
            "initial_peers": self.initial_peers,
            "api_address": self.api_address,
            "http_address": self.http_address,
            "tls_cert": self.tls_certificate,
        }
        return READY_PREFIX + json.dumps(info)

    def stop(self, grace: float = 5.0) -> None:
        """Leaves gracefully: refuses new requests, withdraws the announcement, lets open sessions finish
        (for up to `drain_timeout` seconds; clients of sessions cut after that fail over), then exits the DHT."""
        self._stopped.set()
        if self.api_server is not None:
            self.api_server.stop(grace)
            self.api_servicer.close()
        if self.http_server is not None:
            self.http_server.stop()
        if self.lan_presence is not None:
            self.lan_presence.close()
        if self.servicer is not None:
            self.servicer.stop_accepting()
        if self.dht is not None and self.record is not None:
            ttl = self.settings.network.announce_ttl
            if not swarm_dht.withdraw(self.dht, self.record, ttl):
                logger.warning("could not withdraw the announcement; it expires within %.0fs", ttl)
        if self.servicer is not None:
            deadline = time.monotonic() + self.settings.limits.drain_timeout
            while self.servicer.active_sessions and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.server is not None:
            self.server.stop(grace).wait(timeout=grace + 5)  # grpcio can leave a finished call that never lets stop() end
        if self.servicer is not None:
            self.servicer.batcher.stop()
            self.servicer.pusher.close()
        if self.agents is not None:
            self.agents.close()
        if self.dht is not None:
            self.member_announcer.close()
            self.dht.shutdown()
