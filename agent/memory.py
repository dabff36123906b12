"""Short-term agent memory: a run's chat context, trimmed to a budget while keeping the system message
and the newest turns.

Long-term memory is agent.vector_store (one node's records) placed over the swarm by
agent.memory_placement and kept replicated by agent.memory_replication.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_OVERHEAD_TOKENS = 4


def approx_tokens(text: str) -> int:
    """A rough token count (about 4 characters per token), for when no tokenizer is at hand."""
    return math.ceil(len(text) / 4)


class ShortTermMemory:
    """A run's context as chat messages ``{"role", "content"}``, trimmed to ``max_tokens``/``max_messages``.

    Trimming keeps the system message and drops the oldest other messages first; the newest message is
    always kept, even if it alone exceeds the budget. A ``tool`` message left without the turn that
    called it is dropped too. Each message counts ``count_tokens(content)`` plus a small overhead.
    """

    def __init__(self, max_tokens: int | None = None, max_messages: int | None = None,
                 system: str | None = None, count_tokens: Callable[[str], int] = approx_tokens):
        if max_tokens is None and max_messages is None:
            raise ValueError("ShortTermMemory needs max_tokens or max_messages")
        for name, value in (("max_tokens", max_tokens), ("max_messages", max_messages)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_tokens = max_tokens
        self.max_messages = max_messages
        self.count_tokens = count_tokens
        self._system: dict | None = None
        self._turns: list[dict] = []
        if system is not None:
            self.add("system", system)

    def add(self, role: str, content: str) -> None:
        """Append a message (a system message replaces the current one) and trim."""
        message = _message(role, content)
        if role == "system":
            self._system = message
        else:
            self._turns.append(message)
        self._trim()

    def extend(self, messages: list[dict]) -> None:
        """Add several messages in order."""
        for message in messages:
            self.add(message["role"], message["content"])

    def as_messages(self) -> list[dict]:
        """The context as a new list of message dicts, system message first."""
        head = [dict(self._system)] if self._system else []
        return head + [dict(message) for message in self._turns]

    def token_count(self) -> int:
        """Tokens the current context counts for."""
        return sum(self._cost(message) for message in self.as_messages())

    def __len__(self) -> int:
        return len(self._turns) + (1 if self._system else 0)

    def to_dict(self) -> dict:
        """A JSON-serialisable snapshot for the journal (the token counter itself is not saved)."""
        return {"max_tokens": self.max_tokens, "max_messages": self.max_messages, "messages": self.as_messages()}

    @classmethod
    def from_dict(cls, data: dict, count_tokens: Callable[[str], int] = approx_tokens) -> ShortTermMemory:
        """Rebuild a memory saved by ``to_dict``."""
        memory = cls(max_tokens=data.get("max_tokens"), max_messages=data.get("max_messages"), count_tokens=count_tokens)
        memory.extend(data.get("messages", []))
        return memory

    def _cost(self, message: dict) -> int:
        return self.count_tokens(message["content"]) + MESSAGE_OVERHEAD_TOKENS

    def _over_budget(self, tokens: int) -> bool:
        if self.max_messages is not None and len(self) > self.max_messages:
            return True
        return self.max_tokens is not None and tokens > self.max_tokens

    def _trim(self) -> None:
        tokens = self.token_count()
        while len(self._turns) > 1 and self._over_budget(tokens):
            tokens -= self._cost(self._turns.pop(0))
        while len(self._turns) > 1 and self._turns[0]["role"] == "tool":
            self._turns.pop(0)


def _message(role: str, content: Any) -> dict:
    if role not in ROLES:
        raise ValueError(f"unknown message role {role!r}: expected one of {ROLES}")
    if not isinstance(content, str):
        raise TypeError(f"message content must be str, got {type(content).__name__}")
    return {"role": role, "content": content}
