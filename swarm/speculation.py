"""Speculative greedy decoding by prompt lookup: several tokens per trip through the swarm, same tokens.

Each decode step through the swarm costs at least a round trip per hop, whatever its length (up to a
decode-sized step). Text that repeats its context (summaries, code edits, agents' tool calls and their
long repetitive prompts) can be guessed: the last few tokens often occurred before, and what followed
them then is a good draft of what follows now. The draft needs no extra model.

One step feeds the greedy token and its draft together; the nodes return hidden states for every
position, so the client sees the model's own greedy choice after each drafted token. The draft is
accepted up to the first token that differs from that choice, and the token the model chose there comes
for free; the session then rolls back the positions that were not accepted (every node drops them from
its KV cache: `InferenceSession.roll_back`). Each accepted token is the model's own greedy token, so the
output is that of plain greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from edgeswarm.protocol.constants import DECODE_STEP_TOKENS
from edgeswarm.swarm.session import InferenceSession

# The token and its draft make one decode-sized step (one thread on nodes, decode kernels, the link's
# decode budget), so a verification step costs about what a one-token step does.
MAX_DRAFT_TOKENS = DECODE_STEP_TOKENS - 1
# The n-gram lengths looked up, longest first: a longer match predicts better; 2 tokens still match
# often in repetitive text while staying rare in text that does not repeat.
NGRAM_SIZES = (4, 3, 2)


@dataclass
class SpeculationStats:
    """What speculation did in one generation."""

    steps: int = 0  # decode steps sent through the swarm
    drafted: int = 0  # draft tokens sent
    accepted: int = 0  # draft tokens that were the model's own greedy choice


def prompt_lookup_draft(context: Sequence[int], max_tokens: int, ngram_sizes: Sequence[int] = NGRAM_SIZES) -> list[int]:
    """What followed the latest earlier occurrence of the context's last n tokens (the longest n that
    matches), at most `max_tokens` of it; [] when nothing matches."""
    if max_tokens <= 0:
        return []
    for size in ngram_sizes:
        if len(context) <= size:
            continue
        tail = list(context[-size:])
        for start in range(len(context) - size - 1, -1, -1):
            if list(context[start : start + size]) == tail:
                return list(context[start + size : start + size + max_tokens])
    return []


def speculative_greedy(session: InferenceSession, logits: torch.Tensor, context: list[int], stats: SpeculationStats) -> Iterator[int]:
    """Greedy tokens of a one-row session, one at a time, from `logits` (those of the last position fed;
    `context` holds every token fed so far). Tokens are fed as they are drafted and verified; the caller
    may stop at any token (the session then holds a few more, which a closing session drops)."""
    while True:
        token = int(logits[0].argmax())
        room = session.max_length - session.length - 1  # positions left after the token itself
        draft = prompt_lookup_draft([*context, token], min(MAX_DRAFT_TOKENS, room))
        stats.steps += 1
        if not draft:
            yield token
            context.append(token)
            logits = session.step(torch.tensor([[token]]))
            continue
        before = session.length
        verified = session.step(torch.tensor([[token, *draft]]), all_logits=True)[0]  # [1 + draft, vocab]
        choices = verified.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == choices[accepted]:
            accepted += 1
        stats.drafted += len(draft)
        stats.accepted += accepted
        session.roll_back(before + 1 + accepted)
        context.extend([token, *draft[:accepted]])
        yield token
        yield from draft[:accepted]
        logits = verified[accepted][None]
