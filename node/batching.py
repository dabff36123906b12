"""Iteration-level (continuous) batching: one compute thread runs every session's steps, merging decodes.

gRPC handler threads hand their steps to a `StepBatcher` and wait. Its worker takes, at each iteration:
- every queued single-token decode step of the same span and blocks (up to `max_batch`), and runs them
  as ONE forward (`TransformerSpan.forward_batched_decode`), whatever their lengths and positions; or else
- the oldest other step (a prefill chunk, a padded batch, a stateless forward). A step longer than
  `prefill_chunk` tokens runs one chunk per iteration and goes back to the end of the queue, so that
  the decodes of other sessions go on between the chunks of a long prompt.
Batched decodes run in `row_exact_products()` mode and on one thread, like a decode step alone, so every
session gets exactly the numbers it would get alone on the node: batching never changes anyone's output.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from edgeswarm.model.quantization import row_exact_products
from edgeswarm.model.span import SpanCache, TransformerSpan
from edgeswarm.protocol.constants import DECODE_STEP_TOKENS, PREFILL_CHUNK_TOKENS

logger = logging.getLogger(__name__)

MAX_BATCH = 32  # decode steps of at most this many sessions run as one forward (`swarm-node join --max-batch`)


class BatcherStopped(RuntimeError):
    """The node is shutting down and runs no more steps."""


@dataclass
class StepWork:
    """One step of one session (or a stateless forward) waiting for, or in, the compute thread."""

    span: TransformerSpan
    hidden_states: torch.Tensor  # [batch, length, hidden]
    position_ids: torch.Tensor
    padding_mask: torch.Tensor
    start: int
    end: int
    cache: SpanCache | None
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[torch.Tensor] = field(default_factory=list)
    error: BaseException | None = None
    offset: int = 0  # tokens already run (a long step runs in chunks)

    @property
    def length(self) -> int:
        return self.hidden_states.shape[1]

    @property
    def batchable(self) -> bool:
        """A single-token step of a one-sequence session with no padding: it can join a batched decode."""
        return (
            self.cache is not None
            and self.hidden_states.shape[:2] == (1, 1)
            and bool(self.padding_mask.all())
            and self.cache.batchable
        )

    def batch_key(self) -> tuple[int, int, int]:
        return id(self.span), self.start, self.end


class StepBatcher:
    """The compute thread of a node; see the module docstring."""

    def __init__(self, max_batch: int = MAX_BATCH, prefill_chunk: int = PREFILL_CHUNK_TOKENS, max_threads: int | None = None):
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._max_threads = max_threads or torch.get_num_threads()
        self._queue: deque[StepWork] = deque()
        self._condition = threading.Condition()
        self._stopped = False
        self.batched_steps = 0  # decode steps that ran together with at least one other
        self._worker = threading.Thread(target=self._loop, name="step-batcher", daemon=True)
        self._worker.start()

    def run(
        self,
        span: TransformerSpan,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        padding_mask: torch.Tensor,
        start: int,
        end: int,
        cache: SpanCache | None,
    ) -> torch.Tensor:
        """Runs one step through blocks [start, end) of `span` (appending to `cache`, if any) and returns
        its output hidden states; blocks the calling thread until then."""
        work = StepWork(span, hidden_states, position_ids, padding_mask, start, end, cache)
        with self._condition:
            if self._stopped:
                raise BatcherStopped("this node is shutting down")
            self._queue.append(work)
            self._condition.notify()
        work.done.wait()
        if work.error is not None:
            raise work.error
        return torch.cat(work.outputs, dim=1)

    def stop(self) -> None:
        """Finishes the step in progress, fails the queued ones with BatcherStopped, and ends the thread."""
        with self._condition:
            self._stopped = True
            self._condition.notify()
        self._worker.join(timeout=30)

    # --- the compute thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._stopped:
                    self._condition.wait()
                if self._stopped:
                    self._fail_queued()
                    return
                batch = self._take_batch()
            try:
                if len(batch) > 1:
                    self._run_batched_decode(batch)
                else:
                    self._run_chunk(batch[0])
            except Exception as error:  # one bad step must not stop the node's compute
                logger.exception("a step failed")
                for work in batch:
                    work.error = error
                    work.done.set()

    def _take_batch(self) -> list[StepWork]:
        """The next iteration's work (called with the lock held): all decodes batchable with the oldest
        queued step, or that step alone."""
        first = self._queue.popleft()
        if not first.batchable:
            return [first]
        batch, rest = [first], deque()
        key = first.batch_key()
        while self._queue:
            work = self._queue.popleft()
            if len(batch) < self.max_batch and work.batchable and work.batch_key() == key:
                batch.append(work)
            else:
                rest.append(work)
        self._queue = rest
        return batch

    def _fail_queued(self) -> None:
        for work in self._queue:
            work.error = BatcherStopped("this node is shutting down")
            work.done.set()
        self._queue.clear()

    def _run_batched_decode(self, batch: list[StepWork]) -> None:
        first = batch[0]
        hidden = torch.cat([work.hidden_states for work in batch], dim=0)
        positions = torch.cat([work.position_ids for work in batch], dim=0)
        # one thread, as a decode step alone takes: with two, some reductions split differently
        torch.set_num_threads(1)
        with row_exact_products():
            output = first.span.forward_batched_decode(hidden, positions, [work.cache for work in batch], first.start, first.end)
        self.batched_steps += len(batch)
        for row, work in enumerate(batch):
            work.outputs.append(output[row : row + 1])
            work.done.set()

    def _run_chunk(self, work: StepWork) -> None:
        """Runs the next chunk of `work`; a step with tokens left goes back to the end of the queue."""
        begin, finish = work.offset, min(work.offset + self.prefill_chunk, work.length)
        if work.cache is None:  # a stateless forward: it has nothing to append to, so it runs whole
            begin, finish = 0, work.length
        tokens = work.hidden_states.shape[0] * (finish - begin)
        # a decode-sized step is bound by memory bandwidth: a second thread gains little, while waking a
        # sleeping OpenMP pool for each of the ~10 ops per block costs about 1 ms per 10 blocks
        torch.set_num_threads(1 if tokens <= DECODE_STEP_TOKENS else self._max_threads)
        output = work.span(
            work.hidden_states[:, begin:finish],
            work.position_ids[:, begin:finish],
            work.padding_mask[:, begin:finish],
            work.cache,
            start=work.start,
            end=work.end,
        )
        work.outputs.append(output)
        work.offset = finish
        if finish < work.length:
            with self._condition:
                self._queue.append(work)
        else:
            work.done.set()
