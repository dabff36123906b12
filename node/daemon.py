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
from dataclasses import dataclass, field, replace

import grpc
import psutil

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
from edgeswarm.node.api_access import (
    DEFAULT_REQUESTS_PER_SECOND,
    DEFAULT_TOKENS_PER_MINUTE,
    ApiAccess,
    ClientLimits,
    api_access,
)
from edgeswarm.node.api_service import SwarmApiServicer, start_api_server
from edgeswarm.node.openai_http import OpenAIServer
from edgeswarm.node.service import BlockServicer, ServiceLimits, start_grpc_server
from edgeswarm.partition.coordination import (
    keep_recorded_plan,
    make_plan,
    participants,
    plan_from_record,
    plan_key,
)
from edgeswarm.partition.planner import Plan
from edgeswarm.partition.rebalancing import choose_move
from edgeswarm.partition.span_selection import choose_least_covered_span
from edgeswarm.protocol.call_auth import CallAuthenticator
from edgeswarm.protocol.channels import use_identity, use_swarm_key
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.protocol.swarm_key import read_swarm_key
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm.dht import RecordAuth
from edgeswarm.swarm.links import measure_link
from edgeswarm.swarm.mdns import DEFAULT_SWARM_ID, LanPresence, discover_peers
from edgeswarm.swarm.membership import MemberAnnouncer, MemberDirectory
from edgeswarm.swarm.session import DEFAULT_SPOT_CHECK, SessionPolicy

logger = logging.getLogger(__name__)

READY_PREFIX = "EDGESWARM_READY "


@dataclass
class NodeSettings:
    """Everything `swarm-node join` can be told."""

    model: str = "default"
    host: str = "127.0.0.1"
    port: int = 0
    dht_port: int = 0
    announce_host: str | None = None
    initial_peers: list[str] = field(default_factory=list)
    blocks: tuple[int, int] | None = None
    num_blocks: int | None = None
    announce_ttl: float = 15.0
    max_session_length: int = 8192
    max_batch: int = 32  # decode steps of at most this many sessions run as one forward
    prefill_chunk: int = 256  # longer steps run in chunks of this many tokens, other sessions' decodes between
    kv_memory_mib: int = 1024  # KV-cache room all sessions may reserve together; beyond it new ones are "busy"
    session_idle_timeout: float = 300.0  # seconds without a step after which a session is closed
    max_session_batch: int = ServiceLimits.max_session_batch  # sequences one session may carry
    session_slots: int = ServiceLimits.session_slots  # sessions open at once (node.admission)
    sessions_per_client: int = ServiceLimits.sessions_per_client  # of them, held by one principal (or address)
    crowded_idle_timeout: float = ServiceLimits.crowded_idle_timeout  # idle seconds after which a session makes way when slots are short
    redundancy: int = 2
    rebalance_period: float = 60.0
    drain_timeout: float = 30.0
    partition: str = "auto"  # "auto" (least covered), "pipeline" or "ring" (a swarm-wide plan)
    plan_objective: str = "throughput"  # what the pipeline planner optimises: "throughput" or "latency"
    mdns: bool = True  # find peers on the LAN when none are given, and advertise this node there
    swarm_id: str = DEFAULT_SWARM_ID  # swarms with different ids on one LAN never mix
    announce_maddrs: list[str] = field(default_factory=list)  # public DHT addresses, for nodes behind NAT
    use_relay: bool = True  # let peers reach this node through libp2p relays
    use_auto_relay: bool = False  # look for relays by itself when it is not reachable directly
    quant: str = "none"  # how weights are held: "none" (float32), "bf16" or "int8" (see model.quantization)
    semantic_basis: str = "auto"  # "auto" (cached, else fitted in the background), "off", or a basis file
    agents: bool = True  # take agent steps and coordinate agent runs (TaskService)
    tools_file: str | None = None  # a Python file of @tool functions this node hosts, beside the built-ins
    allow_tools: tuple[str, ...] = ()  # built-in tools that run code (python, sandboxed) this node hosts; none by default
    data_dir: str | None = None  # where memory and the run journal live (default ~/.cache/edgeswarm/nodes/<node id>)
    api_port: int | None = None  # serve the SwarmAPI for apps on this port (0 picks one); None: no API
    http_port: int | None = None  # serve the OpenAI-compatible HTTP API on this port (0 picks one); None: none
    api_token: str | None = None  # clients of both APIs must present it (Bearer token); the API client "default"
    api_tokens: str | None = None  # a JSON file of named API clients with token digests and limits (node.api_access)
    api_rate: float = DEFAULT_REQUESTS_PER_SECOND  # requests per second each API client may make (bursts of twice that), by default
    api_tokens_per_minute: float | None = DEFAULT_TOKENS_PER_MINUTE  # generated tokens per minute each API client may use, by default
    identity: str | None = None  # file of this node's Ed25519 key (created if missing); None: a new key each run
    swarm_key: str | None = None  # file holding a private swarm's shared key; None: an open swarm
    tls: bool = False  # serve gRPC (data plane, tasks, API) over TLS with a certificate bound to the identity
    spot_check: float = DEFAULT_SPOT_CHECK  # the spot-check rate of this node's own clients (APIs, llm steps)


def reachable_host(host: str, announce_host: str | None) -> str:
    """The address peers should dial: the announce host, the bind host, or for 0.0.0.0 the first LAN IPv4."""
    if announce_host:
        return announce_host
    if host not in ("0.0.0.0", ""):
        return host
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family.name == "AF_INET" and not address.address.startswith("127."):
                return address.address
    return "127.0.0.1"


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in every child this process forks (hivemind's DHT process): the kernel kills the child when
    this process dies, even by SIGKILL, so no orphaned DHT peer (nor its p2pd, which exits with it) is left."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _check_allowed_tools(settings: NodeSettings) -> None:
    """Fails fast (ValueError) when --allow-tools names a tool that cannot be hosted here, e.g. python without bwrap."""
    if not settings.agents:
        raise ValueError("--allow-tools needs the agent services: drop --no-agents")
    try:
        check_allowed_tools(settings.allow_tools)
    except SandboxUnavailableError as error:
        raise ValueError(f"--allow-tools python: {error}") from error


class SwarmNode:
    """A running node. `start()` returns once it serves and is announced; `stop()` withdraws and shuts down."""

    def __init__(self, settings: NodeSettings):
        self.settings = settings
        self.model: ModelSource = open_model(settings.model)  # fails fast on a bad path or family
        if settings.blocks is not None:
            self.model.check_span(*settings.blocks)
        if (settings.api_port is not None or settings.http_port is not None) and not settings.agents:
            raise ValueError("--api-port and --http-port need the agent services: drop --no-agents")
        if settings.allow_tools:
            _check_allowed_tools(settings)
        if settings.num_blocks is not None and not 0 < settings.num_blocks <= self.model.num_blocks:
            raise ValueError(f"--num-blocks must be in [1, {self.model.num_blocks}], got {settings.num_blocks}")
        self.identity = NodeIdentity.load_or_create(settings.identity) if settings.identity else NodeIdentity.generate()
        self.api_access: ApiAccess = api_access(  # a bad tokens file fails fast
            self.identity.fingerprint,
            settings.api_tokens,
            settings.api_token,
            ClientLimits.per_second(settings.api_rate, settings.api_tokens_per_minute),
        )
        self.tls: tuple[bytes, bytes] | None = None  # (certificate PEM, key PEM) with --tls
        self.swarm_key = read_swarm_key(settings.swarm_key) if settings.swarm_key else None
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

    def _choose_span(self) -> tuple[int, int]:
        if self.settings.blocks is not None:
            return self.settings.blocks
        length = self.settings.num_blocks or blocks_that_fit(self.model.config, quant=self.settings.quant)
        records = swarm_dht.fetch_servers(self.dht, self.model.model_id, self.model.num_blocks)
        return choose_least_covered_span(records, self.model.num_blocks, length)

    def start(self) -> None:
        settings = self.settings
        if sys.platform == "linux":
            os.register_at_fork(after_in_child=_die_with_parent)
        initial_peers = list(settings.initial_peers)
        if not initial_peers and settings.mdns:
            initial_peers = discover_peers(settings.swarm_id)
            logger.info("mDNS found %d peers of swarm %r", len(initial_peers), settings.swarm_id)
        self.dht = swarm_dht.start_dht(
            initial_peers,
            host=settings.host,
            port=settings.dht_port,
            announce_maddrs=settings.announce_maddrs or None,
            use_relay=settings.use_relay,
            use_auto_relay=settings.use_auto_relay,
            swarm_key=self.swarm_key,
        )
        swarm_dht.use_auth(self.dht, RecordAuth(self.identity, self.swarm_key))
        self.member_announcer = MemberAnnouncer(self.dht, self.identity.fingerprint, "node")
        node_id = self.identity.fingerprint
        start, end = self._choose_span()
        rss_before = psutil.Process().memory_info().rss
        span = self._load_span(start, end)
        load_rss_growth = psutil.Process().memory_info().rss - rss_before
        throughput = measure_decode_throughput(span)
        prefill_throughput = measure_prefill_throughput(span)
        limits = ServiceLimits(
            max_session_length=settings.max_session_length,
            max_batch=settings.max_batch,
            prefill_chunk=settings.prefill_chunk,
            kv_memory_bytes=settings.kv_memory_mib * 2**20,
            session_idle_timeout=settings.session_idle_timeout,
            max_session_batch=settings.max_session_batch,
            session_slots=settings.session_slots,
            sessions_per_client=settings.sessions_per_client,
            crowded_idle_timeout=settings.crowded_idle_timeout,
        )
        self.servicer = BlockServicer(span, self.model.model_id, node_id, throughput, limits, load_rss_growth)
        host = reachable_host(settings.host, settings.announce_host)
        self.tls = self.identity.tls_certificate([host]) if settings.tls else None
        add_services = (lambda server, port: self._add_agent_services(server, f"{host}:{port}")) if settings.agents else None
        self.members = MemberDirectory(self.dht)
        authenticator = CallAuthenticator(node_id, self.members.is_member, self.swarm_key)
        self.server, port = start_grpc_server(self.servicer, settings.host, settings.port, authenticator, add_services, self.tls)
        self.record = ServerRecord(
            node_id=node_id,
            address=f"{host}:{port}",
            model_id=self.model.model_id,
            start_block=start,
            end_block=end,
            throughput=self.servicer.announced_throughput,
            kv_free_bytes=self._kv_free_bytes(),
            prefill_throughput=prefill_throughput,
            max_blocks=settings.num_blocks or blocks_that_fit(self.model.config, quant=self.settings.quant),
            memory_bytes=psutil.virtual_memory().available,
            partition=settings.partition,
            codecs=tuple(self.servicer.codecs),
            weight_quant=settings.quant,
            tls_cert=self.tls_certificate,
        )
        self._measure_links()
        if not swarm_dht.announce(self.dht, self.record, settings.announce_ttl):
            logger.warning("the DHT did not accept the first announcement; retrying in the refresh loop")
        if self.agents is not None:
            self.agents.announce(settings.announce_ttl)
            self._start_apis()
        threading.Thread(target=self._refresh_announcement, name="announce", daemon=True).start()
        if settings.mdns:
            try:
                self.lan_presence = LanPresence(node_id, settings.swarm_id, self.initial_peers, self._join_lan_peers)
            except ValueError as error:  # e.g. a node on loopback only: there is no LAN to advertise on
                logger.info("not advertising over mDNS: %s", error)
        if settings.blocks is None and settings.rebalance_period > 0:
            threading.Thread(target=self._rebalance, name="rebalance", daemon=True).start()
        if settings.semantic_basis != "off":
            threading.Thread(target=self._prepare_semantic_basis, name="semantic-basis", daemon=True).start()

    def _add_agent_services(self, server: grpc.Server, address: str) -> None:
        node_id = self.identity.fingerprint
        data_dir = self.settings.data_dir or os.path.expanduser(f"~/.cache/edgeswarm/nodes/{node_id}")
        self.agents = AgentServices(
            node_id, address, self.model, self.dht, data_dir, self.settings.tools_file, tls_cert=self.tls_certificate,
            swarm_key=self.swarm_key, allow_tools=self.settings.allow_tools,
            session_policy=SessionPolicy(spot_check=self.settings.spot_check),
        )
        self.agents.add_to(server)

    @property
    def tls_certificate(self) -> str:
        """The PEM certificate this node serves TLS with ("" without --tls)."""
        return self.tls[0].decode() if self.tls else ""

    def _start_apis(self) -> None:
        """The SwarmAPI (gRPC) and the OpenAI-compatible HTTP endpoint, as configured."""
        settings, agents = self.settings, self.agents
        host = reachable_host(settings.host, settings.announce_host)
        if settings.api_port is not None:
            self.api_servicer = SwarmApiServicer(agents.new_swarm_client, self.model, self.dht, agents.directory)
            self.api_server, port = start_api_server(self.api_servicer, settings.host, settings.api_port, self.api_access, self.tls)
            self.api_address = f"{host}:{port}"
        if settings.http_port is not None:
            self.http_server = OpenAIServer(
                agents.new_swarm_client,
                settings.host,
                settings.http_port,
                access=self.api_access,
                tls=self.tls,
            )
            self.http_address = f"{host}:{self.http_server.start()}"

    def _prepare_semantic_basis(self) -> None:
        """Loads (or fits and caches) the semantic codec's basis, then offers the codec to clients."""
        try:
            if self.settings.semantic_basis == "auto":
                basis = load_or_fit_basis(self.model)
            else:
                basis = load_basis(self.settings.semantic_basis)
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
        return TransformerSpan(self.model.config, start, end, states, quant=self.settings.quant)

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
        settings = self.settings
        while not self._stopped.wait(settings.rebalance_period * random.uniform(0.7, 1.3)):
            try:
                if settings.partition == "auto":
                    records = swarm_dht.fetch_servers(self.dht, self.model.model_id, self.model.num_blocks)
                    target = choose_move(records, self.record, self.model.num_blocks, settings.redundancy)
                else:
                    self._measure_links()
                    target = self._planned_span()
                if target is not None and target != (self.record.start_block, self.record.end_block):
                    if not self._stopped.is_set():
                        self.move_to(*target)
            except Exception:  # a failed round must not end rebalancing: the next one retries
                logger.exception("rebalancing round failed")

    def _planned_span(self) -> tuple[int, int] | None:
        """This node's stage in the recorded plan, after recording a new plan if this node coordinates."""
        settings, model = self.settings, self.model
        records = swarm_dht.fetch_servers(self.dht, model.model_id, model.num_blocks)
        records = [self.record if r.node_id == self.record.node_id else r for r in records]
        members = participants(records, settings.partition)
        key = plan_key(model.model_id)
        recorded, recorded_members = self._recorded_plan(key, members)
        activation_bytes = model.config.hidden_size * 4
        if members and members[0].node_id == self.record.node_id:  # the coordinator
            new = make_plan(members, settings.partition, model.num_blocks, activation_bytes, settings.plan_objective)
            if not keep_recorded_plan(
                recorded, recorded_members, new, members, model.num_blocks, activation_bytes, settings.plan_objective
            ):
                recorded, recorded_members = new, [member.node_id for member in members]
                logger.info("recording a new %s plan: %s", settings.partition, new.to_dict())
            value = {"partition": settings.partition, "plan": recorded.to_dict(), "members": recorded_members}
            swarm_dht.store_value(self.dht, key, value, 3 * settings.rebalance_period)
        stage = next((s for s in recorded.stages if s.node_id == self.record.node_id), None) if recorded else None
        return None if stage is None else (stage.start, stage.end)

    def _recorded_plan(self, key: str, members: list[ServerRecord]) -> tuple[Plan | None, list[str]]:
        """The plan in the DHT and the participants it was made for, if the coordinator that `members`
        elect signed it; (None, []) if absent, malformed, or signed by anyone else."""
        found = swarm_dht.fetch_value(self.dht, key)
        recorded = found and plan_from_record(found[0], found[1], self.settings.partition, members)
        if found and not recorded:
            logger.warning("ignoring the recorded plan signed by %s: not a well-formed %s plan of the elected coordinator", found[1], self.settings.partition)
        return recorded or (None, [])

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
        swarm_dht.announce(self.dht, record, self.settings.announce_ttl)
        logger.info("moved from blocks %d:%d to %d:%d in %.1fs", *old, start, end, time.monotonic() - began)
        print(f"moved from blocks {old[0]}:{old[1]} to {start}:{end}", flush=True)

    def _kv_free_bytes(self) -> int:
        return self.servicer.kv_budget.free_bytes

    def _refresh_announcement(self) -> None:
        interval = self.settings.announce_ttl / 3
        while not self._stopped.wait(interval):
            record = self._update_record(kv_free_bytes=self._kv_free_bytes())
            swarm_dht.announce(self.dht, record, self.settings.announce_ttl)  # a failure is retried next round
            if self.agents is not None:
                self.agents.announce(self.settings.announce_ttl)

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
            if not swarm_dht.withdraw(self.dht, self.record, self.settings.announce_ttl):
                logger.warning("could not withdraw the announcement; it expires within %.0fs", self.settings.announce_ttl)
        if self.servicer is not None:
            deadline = time.monotonic() + self.settings.drain_timeout
            while self.servicer.active_sessions and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.server is not None:
            self.server.stop(grace).wait(timeout=grace + 5)  # grpcio can leave a finished call that never lets stop() end
        if self.servicer is not None:
            self.servicer.batcher.stop()
        if self.agents is not None:
            self.agents.close()
        if self.dht is not None:
            self.member_announcer.close()
            self.dht.shutdown()
