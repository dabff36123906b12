"""A client inference session: the chain of hops that holds one conversation's KV caches."""

from __future__ import annotations

import uuid

import torch

from swarm.routing import Hop
from swarm.transport import SpanStream


def positions_for(padding_mask: torch.Tensor, tokens_before: torch.Tensor) -> torch.Tensor:
    """Rotary positions of new tokens: each row counts only its real tokens, as transformers does.

    padding_mask: [batch, length] bool for the new tokens; tokens_before: [batch] real tokens already seen.
    Padding gets position 0 (it is never attended to, so its position only needs to be valid).
    """
    counts = tokens_before[:, None] + padding_mask.long().cumsum(dim=1)
    return torch.where(padding_mask, counts - 1, torch.zeros_like(counts))


class InferenceSession:
    """Step-by-step inference through the swarm. Use as a context manager, or call `close()`.

    Each `step(input_ids)` appends tokens to every hop's KV cache and returns the logits of the last
    position of every row. Long inputs are sent in chunks of `prefill_chunk` tokens.
    """

    def __init__(
        self,
        client,  # swarm.client.SwarmClient; not annotated to avoid an import cycle
        route: list[Hop],
        max_length: int,
        prefill_chunk: int = 256,
        step_timeout: float = 60.0,
    ):
        self.client = client
        self.route = route
        self.max_length = max_length
        self.prefill_chunk = prefill_chunk
        self.step_timeout = step_timeout
        self.session_id = uuid.uuid4().hex
        self.length = 0  # positions appended so far (padding included)
        self._tokens_seen: torch.Tensor | None = None  # [batch] real tokens so far
        self._streams: list[SpanStream] = []
        try:
            for hop in route:
                self._streams.append(
                    SpanStream(hop, self.session_id, client.model.model_id, max_length, client.connect_timeout)
                )
        except Exception:
            self.close()
            raise

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams = []

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feeds [batch, length] token ids (0 in attention_mask marks left padding); returns [batch, vocab] logits."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {list(mask.shape)} does not match input_ids {list(input_ids.shape)}")
        if self._tokens_seen is None:
            self._tokens_seen = torch.zeros(input_ids.shape[0], dtype=torch.long)
        elif input_ids.shape[0] != self._tokens_seen.shape[0]:
            raise ValueError(f"this session has batch size {self._tokens_seen.shape[0]}, got {input_ids.shape[0]}")
        if self.length + input_ids.shape[1] > self.max_length:
            raise ValueError(f"session would grow to {self.length + input_ids.shape[1]} tokens, above max_length {self.max_length}")
        hidden = None
        for begin in range(0, input_ids.shape[1], self.prefill_chunk):
            chunk_ids = input_ids[:, begin : begin + self.prefill_chunk]
            chunk_mask = mask[:, begin : begin + self.prefill_chunk]
            positions = positions_for(chunk_mask, self._tokens_seen)
            hidden = self._run_hops(self.client.head.embed(chunk_ids), positions, chunk_mask)
            self._tokens_seen = self._tokens_seen + chunk_mask.long().sum(dim=1)
            self.length += chunk_ids.shape[1]
        return self.client.head.logits(hidden[:, -1])

    def _run_hops(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for stream in self._streams:
            hidden = stream.step(hidden, positions, mask, self.step_timeout)
        return hidden

    def describe_route(self) -> str:
        return " -> ".join(hop.describe() for hop in self.route)
