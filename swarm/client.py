"""`ModelClient`: generate text with a model whose blocks are spread over the swarm (edgeswarm.SwarmClient
adds agent tasks and memory: edgeswarm.agent.client)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import hivemind
import torch

from edgeswarm.model.calibration import load_or_fit_basis
from edgeswarm.model.sources import ModelSource, open_model
from edgeswarm.protocol.channels import process_identity
from edgeswarm.protocol.codecs import SemanticBasis
from edgeswarm.protocol.constants import MAX_ATTEMPTS, PREFILL_CHUNK_TOKENS
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.link_policy import LinkQuality
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm.errors import (
    NodeUnavailableError,
    NoRouteError,
    SwarmConnectionError,
)
from edgeswarm.swarm.head import ClientHead
from edgeswarm.swarm.links import LinkCodecs
from edgeswarm.swarm.mdns import DEFAULT_SWARM_ID, discover_peers
from edgeswarm.swarm.membership import join_as_client
from edgeswarm.swarm.policy import SessionPolicy
from edgeswarm.swarm.routes import REPLACEMENT_POLL_SECONDS, Banlist, RouteManager
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.sampling import cut_at_stop, next_tokens
from edgeswarm.swarm.session import InferenceSession, positions_for
from edgeswarm.swarm.speculation import SpeculationStats, speculative_greedy
from edgeswarm.swarm.transport import forward_hop

logger = logging.getLogger(__name__)

# A batch of prompts runs at most this many sessions at once.
MAX_PARALLEL_SESSIONS = 32


@dataclass
class GenerationResult:
    """One prompt's continuation: its text (None without a tokenizer), its token ids, and why it ended."""

    text: str | None
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" or "length"
    route: list[Hop] = field(default_factory=list)
    speculation: SpeculationStats | None = None  # what speculative decoding did, when it ran


@dataclass
class Sampling:
    """How the next token is chosen: greedy, or sampled with `temperature` and `top_p` (seeded by `seed`)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @cached_property
    def generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


@dataclass
class TokenEvent:
    """One streamed token and the text it added."""

    token_id: int
    text: str


class ModelClient:
    """A client of the swarm. It holds the embeddings, final norm and LM head; nodes run the blocks.

    A node that dies or stalls mid-generation is replaced without losing a token (see `SessionPolicy`);
    `routes` (swarm.routes.RouteManager) knows the servers, and keeps a node that failed out of routes for
    `ban_seconds` (a busy one for as long as it asks, at least `busy_seconds`).

    >>> client = SwarmClient(initial_peers=["/ip4/127.0.0.1/tcp/31337/p2p/12D3Koo..."])  # or SwarmClient() on a LAN
    >>> client.generate("The capital of France is", max_new_tokens=8).text
    """

    def __init__(
        self,
        initial_peers: Sequence[str] | None = None,
        model: str | ModelSource = "default",
        policy: SessionPolicy = SessionPolicy(),
        max_route_attempts: int = MAX_ATTEMPTS,
        ban_seconds: float = 60.0,
        busy_seconds: float = 0.0,
        swarm_id: str = DEFAULT_SWARM_ID,
        mdns: bool = True,
        link_quality: LinkQuality | str = "lossless",
        dht: hivemind.DHT | None = None,
        swarm_key: bytes | None = None,
        identity: NodeIdentity | None = None,
        banlist: Banlist | None = None,
    ):
        """`dht`: a running DHT peer to use (a node's own) instead of joining as a new client peer.
        `model` may also be an opened ModelSource. `swarm_key`: a private swarm's key
        (protocol.swarm_key.read_swarm_key), without which its records and nodes are out of reach.
        `identity`: the key this client signs its calls with and owns its memory namespaces by
        (protocol.identity.NodeIdentity.load_or_create(FILE) keeps one across runs); by default this
        process's identity (protocol.channels.process_identity), ephemeral unless set. `banlist`: bans to
        share with other parts of the program (the agent scheduler shares the client's)."""
        if dht is None and not initial_peers and mdns:  # look for the swarm on the LAN
            initial_peers = discover_peers(swarm_id)
        if dht is None and not initial_peers:
            searched = f"mDNS found no node of swarm {swarm_id!r} on the LAN" if mdns else "mDNS is off"
            raise SwarmConnectionError(
                f"no initial peers given, and {searched}: pass the multiaddr a node printed when it started"
            )
        self.model: ModelSource = model if isinstance(model, ModelSource) else open_model(model)
        self.policy = policy
        self.max_route_attempts = max_route_attempts
        self.identity = identity or process_identity()
        self.swarm_key = swarm_key
        self._owns_dht = dht is None
        self.dht = swarm_dht.start_dht(initial_peers, client_mode=True, swarm_key=swarm_key) if dht is None else dht
        self._member = join_as_client(self.dht, swarm_key, self.identity) if self._owns_dht else None
        self.routes = RouteManager(
            self.dht, self.model.model_id, self.model.num_blocks, self.identity, banlist, ban_seconds, busy_seconds
        )
        if isinstance(link_quality, str):
            link_quality = LinkQuality.parse(link_quality)
        self.links = LinkCodecs(link_quality, self.model.config.hidden_size, self._semantic_basis, self.identity)
        self._basis_lock = threading.Lock()
        self._basis: SemanticBasis | None = None
        self._basis_tried = False

    def _semantic_basis(self) -> SemanticBasis | None:
        """The semantic codec's basis for this model, loaded (or fitted: see model.calibration) on first use."""
        with self._basis_lock:
            if not self._basis_tried:
                self._basis_tried = True
                try:
                    self._basis = load_or_fit_basis(self.model)
                except Exception as error:  # then the semantic codec is simply not used
                    logger.warning("the semantic codec is unavailable: %s", error)
            return self._basis

    @cached_property
    def head(self) -> ClientHead:
        return ClientHead(self.model.config, self.model.head_weights())

    @cached_property
    def tokenizer(self):
        return self.model.tokenizer()

    def close(self) -> None:
        if self._owns_dht:
            self._member.close()
            self.dht.shutdown()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- routing ---------------------------------------------------------------------------------

    def servers(self) -> list[ServerRecord]:
        """The online nodes announced for this model."""
        return self.routes.servers()

    def route(self) -> list[Hop]:
        """The fastest chain of usable nodes over all blocks, from the DHT's current records and the speeds
        this client measured."""
        return self.routes.route()

    def inference_session(
        self, max_length: int = 2048, prefill_chunk: int = PREFILL_CHUNK_TOKENS, route: list[Hop] | None = None, policy: SessionPolicy | None = None
    ) -> InferenceSession:
        """Opens a session through the swarm (along `route`, or the best one; with `policy`, or the
        client's); nodes that do not answer are banned and routed around. While blocks have no node (one
        may be moving to another span), it waits for them up to the policy's `replacement_wait`."""
        policy = policy or self.policy
        attempt, deadline = 1, time.monotonic() + policy.replacement_wait
        while True:
            try:
                return InferenceSession(self.routes, self.head, self.links, policy, max_length, route, prefill_chunk)
            except NoRouteError:
                if route is not None or time.monotonic() > deadline:
                    raise
                time.sleep(REPLACEMENT_POLL_SECONDS)
            except NodeUnavailableError as error:
                if error.node_id is None or attempt >= self.max_route_attempts or route is not None:
                    raise
                logger.warning("routing around an unreachable node: %s", error)
                self.routes.report_failure(error)
                attempt += 1

    # --- inputs ----------------------------------------------------------------------------------

    def _encode(self, prompt) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Prompt(s) to left-padded [batch, length] ids and mask, and whether a batch was given."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            return encoded["input_ids"], encoded["attention_mask"].bool(), not isinstance(prompt, str)
        if isinstance(prompt, torch.Tensor):
            rows = [prompt.tolist()] if prompt.dim() == 1 else prompt.tolist()
            is_batch = prompt.dim() == 2
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, tuple)):
            rows, is_batch = [list(row) for row in prompt], True
        elif isinstance(prompt, list) and prompt and all(isinstance(token, int) for token in prompt):
            rows, is_batch = [prompt], False
        else:
            raise ValueError("prompt must be a string, a list of strings, token ids, or a batch of token ids")
        if any(len(row) == 0 for row in rows):
            raise ValueError("a prompt is empty")
        width = max(len(row) for row in rows)
        pad = self._pad_token_id
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.long)
        mask = torch.tensor([[False] * (width - len(row)) + [True] * len(row) for row in rows])
        return ids, mask, is_batch

    @property
    def _pad_token_id(self) -> int:
        config = self.model.config
        for candidate in (config.pad_token_id, self._eos_token_ids[0] if self._eos_token_ids else None, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    @cached_property
    def _eos_token_ids(self) -> list[int]:
        eos = self.model.config.eos_token_id
        ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return sorted(set(ids))

    def _decode(self, token_ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text for a chat, as the model's own template writes it."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # --- generation ------------------------------------------------------------------------------

    def _generate_rows(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        max_new_tokens: int,
        sampling: Sampling,
        stop: Sequence[str],
        speculate: bool,
    ) -> Iterator[tuple[torch.Tensor, list[GenerationResult | None]]]:
        """Yields each generated position's [batch] tokens and the rows that finished (a result) or not (None)."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        batch = input_ids.shape[0]
        generated: list[list[int]] = [[] for _ in range(batch)]
        results: list[GenerationResult | None] = [None] * batch
        with self.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
            logits = session.step(input_ids, mask)
            stats = None
            if speculate and not sampling.do_sample and batch == 1:  # greedy-exact: swarm.speculation
                stats = SpeculationStats()
                tokens = (torch.tensor([token]) for token in speculative_greedy(session, logits, input_ids[0][mask[0]].tolist(), stats))
            else:
                tokens = self._decoded_tokens(session, logits, sampling, results)
            for step, step_tokens in zip(range(max_new_tokens), tokens):
                for row in range(batch):
                    if results[row] is None:
                        results[row] = self._row_progress(generated[row], int(step_tokens[row]), stop, session.route)
                last = step == max_new_tokens - 1 or all(result is not None for result in results)
                if last:
                    for row in range(batch):
                        if results[row] is None:
                            results[row] = GenerationResult(self._decode(generated[row]), generated[row], "length", session.route)
                        results[row].speculation = stats
                yield step_tokens, results
                if last:
                    return

    def _decoded_tokens(
        self, session: InferenceSession, logits: torch.Tensor, sampling: Sampling, results: list[GenerationResult | None]
    ) -> Iterator[torch.Tensor]:
        """Each position's [batch] tokens, one step through the swarm each; rows that finished (`results`)
        keep decoding padding, as transformers does, and their output is ignored."""
        while True:
            tokens = next_tokens(logits, sampling.do_sample, sampling.temperature, sampling.top_p, sampling.generator)
            yield tokens
            feed = torch.tensor([self._pad_token_id if results[row] is not None else int(tokens[row]) for row in range(len(results))])
            logits = session.step(feed[:, None])

    def _row_progress(self, generated: list[int], token: int, stop: Sequence[str], route: list[Hop]):
        """Appends `token` to a row; returns the row's result if it has now finished, else None."""
        if token in self._eos_token_ids:
            return GenerationResult(self._decode(generated), list(generated), "eos", route)
        generated.append(token)
        if stop:
            text, stopped = cut_at_stop(self._decode(generated) or "", stop)
            if stopped:
                return GenerationResult(text, list(generated), "stop", route)
        return None

    def generate(
        self,
        prompt,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        micro_batch: int = 1,
        speculate: bool = True,
    ) -> GenerationResult | list[GenerationResult]:
        """Continues a prompt (text or token ids) or a batch of them; greedy unless `do_sample`.

        Generation ends at an end-of-sequence token, at any of the `stop` strings (cut from the text),
        or after `max_new_tokens`. A batch returns one result per prompt. A batch is split into
        micro-batches of `micro_batch` prompts (left-padded within each), all generated at once in their
        own sessions: they pipeline through the swarm, and nodes merge their decode steps (node.batching).
        `micro_batch=len(prompts)` runs one padded session instead. Micro-batch i samples with `seed + i`.
        Greedy one-prompt sessions speculate (swarm.speculation: the same tokens, in fewer trips through
        the swarm) unless `speculate` is False.
        """
        input_ids, mask, is_batch = self._encode(prompt)
        if micro_batch < 1:
            raise ValueError("micro_batch must be at least 1")
        groups = [range(begin, min(begin + micro_batch, len(input_ids))) for begin in range(0, len(input_ids), micro_batch)]

        def run(index: int) -> list[GenerationResult]:
            rows = list(groups[index])
            width = int(mask[rows].sum(dim=1).max())  # drop padding columns that no row of this group needs
            results = None
            sampling = Sampling(do_sample, temperature, top_p, None if seed is None else seed + index)
            for _, results in self._generate_rows(input_ids[rows, -width:], mask[rows, -width:], max_new_tokens, sampling, stop, speculate):
                pass
            return results

        if len(groups) == 1:
            outcomes = [run(0)]
        else:
            with ThreadPoolExecutor(min(len(groups), MAX_PARALLEL_SESSIONS), thread_name_prefix="micro-batch") as pool:
                outcomes = list(pool.map(run, range(len(groups))))
        results = [result for group in outcomes for result in group]
        return results if is_batch else results[0]

    def stream(
        self,
        prompt,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        speculate: bool = True,
    ) -> Iterator[TokenEvent]:
        """Like `generate` for one prompt, yielding each token as soon as the swarm produces it."""
        input_ids, mask, is_batch = self._encode(prompt)
        if is_batch:
            raise ValueError("stream() takes one prompt; use generate() for a batch")
        emitted_text, generated = "", []
        sampling = Sampling(do_sample, temperature, top_p, seed)
        for tokens, results in self._generate_rows(input_ids, mask, max_new_tokens, sampling, stop, speculate):
            token = int(tokens[0])
            finished = results[0]
            if finished is not None and finished.finish_reason == "eos":
                return
            generated.append(token)
            text = finished.text if finished is not None else self._decode(generated)
            piece = (text or "")[len(emitted_text) :]
            emitted_text = text or ""
            yield TokenEvent(token_id=token, text=piece)
            if finished is not None:
                return

    def chat(self, messages: list[dict], **generate_kwargs) -> GenerationResult:
        """Answers a chat ([{"role": "user", "content": ...}, ...]) with the model's chat template."""
        return self.generate(self.apply_chat_template(messages), **generate_kwargs)

    # --- stateless forward -----------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, timeout: float = 120.0) -> torch.Tensor:
        """Logits [batch, length, vocab] for whole sequences, through stateless Forward calls (no KV cache)."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
        positions = positions_for(mask, torch.zeros(input_ids.shape[0], dtype=torch.long))
        hidden = self.head.embed(input_ids)
        for hop in self.route():
            codecs = self.links.for_step(hop, *hidden.shape[:2])
            hidden = forward_hop(hop, self.model.model_id, hidden, positions, mask, timeout, self.policy.connect_timeout, codecs, identity=self.identity)
        return self.head.logits(hidden)
