"""`llm` steps on a node: the node drives the model pipeline as a client, keeping each run's KV prefix.

A run's llm steps are placed on the node that ran its previous one (agent.scheduler). Each call's prompt
is the previous prompt, the previous output and some new messages, so the node keeps the run's swarm
inference session open and feeds only the text that is new: the pipeline's nodes already hold the KV
cache of the rest. The new text is tokenised on its own, which may split its first word differently from
tokenising the whole prompt; the text the model sees is the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeswarm.agent.steppers import SessionStepper
from edgeswarm.agent.tool_decoding import (
    DEFAULT_ANSWER_TOKENS,
    MAX_CALLS,
    SMOLLM2_CALL_BIAS,
    ToolTurn,
    call_room,
    decide,
    prompt_text,
)

logger = logging.getLogger(__name__)

DEFAULT_SESSION_LENGTH = 4096
MAX_ANSWER_TOKENS = 256


@dataclass
class _RunSession:
    """A run's open inference session and the exact text its KV cache holds."""

    stepper: SessionStepper
    text: str
    used: float  # monotonic time of the last step


class _StreamingStepper:
    """Passes steps through, reporting the text of every generated token (all steps after the prompt)."""

    def __init__(self, inner: SessionStepper, tokenizer, on_text: Callable[[str], None] | None):
        self.inner, self.tokenizer, self.on_text = inner, tokenizer, on_text
        self._prompt_fed = False

    def step(self, input_ids):
        logits = self.inner.step(input_ids)
        if self._prompt_fed and self.on_text is not None:
            self.on_text(self.tokenizer.decode(list(input_ids[0]), skip_special_tokens=True))
        self._prompt_fed = True
        return logits


class LLMWorker:
    """Runs llm steps through the swarm with `client` (a swarm.client.SwarmClient, made on first use by
    `client_factory`; it is not closed here)."""

    def __init__(self, client_factory: Callable[[], Any], max_sessions: int = 8, idle_seconds: float = 300.0):
        self._client_factory = client_factory
        self._client = None
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self._sessions: dict[str, _RunSession] = {}
        self._lock = threading.Lock()
        self._run_locks: dict[str, threading.Lock] = {}

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client

    def run(self, run_id: str, args: dict, on_text: Callable[[str], None] | None = None) -> dict:
        """Decides tool calls or answers for `args` (see agent.steps); reuses the run's KV prefix if it can."""
        messages, tools = _messages(args), _tools(args)
        turn = ToolTurn(
            tools,
            allow_answer=bool(args.get("allow_answer", True)),
            answer_only=bool(args.get("answer_only")),
            max_calls=min(int(args.get("max_calls", MAX_CALLS)), MAX_CALLS),
            max_answer_tokens=min(int(args.get("max_answer_tokens", DEFAULT_ANSWER_TOKENS)), MAX_ANSWER_TOKENS),
            call_bias=float(args.get("call_bias", SMOLLM2_CALL_BIAS)),
        )
        client = self.client
        tokenizer = client.tokenizer
        text = prompt_text(tokenizer, messages, tools)
        with self._run_lock(run_id):
            session, new_text = self._session_for(run_id, text, turn.max_answer_tokens)
            prompt_ids = list(tokenizer.encode(new_text, add_special_tokens=False))
            reused = len(session.stepper.fed)
            began = time.perf_counter()
            try:
                outcome = decide(_StreamingStepper(session.stepper, tokenizer, on_text), tokenizer, prompt_ids, turn)
            except Exception:
                self.forget(run_id)  # its cache no longer matches any text we know
                raise
            decision = outcome.decision
            fed_output = decision.token_ids[: decision.fed_tokens]
            session.text = text + tokenizer.decode(fed_output, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            session.used = time.monotonic()
            return {
                "calls": [{"name": call.name, "arguments": call.arguments} for call in outcome.calls],
                "answer": outcome.answer,
                "text": decision.text,
                "prompt_tokens": reused + len(prompt_ids),
                "reused_tokens": reused,
                "generated_tokens": decision.tokens,
                "seconds": time.perf_counter() - began,
                "route": [hop.record.node_id for hop in session.stepper.session.route],
            }

    def _session_for(self, run_id: str, text: str, max_answer: int) -> tuple[_RunSession, str]:
        """The run's session and the part of `text` it has not seen; a new session if the old cannot continue."""
        with self._lock:
            session = self._sessions.get(run_id)
        output_room = max_answer + call_room(MAX_CALLS)
        # a character count bounds the token count from above
        if session is not None and text.startswith(session.text):
            if session.stepper.room >= len(text) - len(session.text) + output_room:
                return session, text[len(session.text) :]
        self.forget(run_id)
        self._evict()
        length = max(DEFAULT_SESSION_LENGTH, len(text) + output_room)
        session = _RunSession(SessionStepper(self.client.inference_session(max_length=length)), "", time.monotonic())
        with self._lock:
            self._sessions[run_id] = session
        return session, text

    def _run_lock(self, run_id: str) -> threading.Lock:
        with self._lock:
            return self._run_locks.setdefault(run_id, threading.Lock())

    def forget(self, run_id: str) -> None:
        """Closes a run's session (its KV caches on the pipeline's nodes are freed)."""
        with self._lock:
            session = self._sessions.pop(run_id, None)
        if session is not None:
            session.stepper.session.close()

    def _evict(self) -> None:
        """Closes sessions idle for too long, and the least recently used beyond `max_sessions - 1`."""
        now = time.monotonic()
        with self._lock:
            by_age = sorted(self._sessions.items(), key=lambda item: item[1].used)
        for index, (run_id, session) in enumerate(by_age):
            if now - session.used > self.idle_seconds or len(by_age) - index >= self.max_sessions:
                self.forget(run_id)

    def close(self) -> None:
        with self._lock:
            run_ids = list(self._sessions)
        for run_id in run_ids:
            self.forget(run_id)


def _messages(args: dict) -> list[dict]:
    messages = args.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("an llm step needs a non-empty list of messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"malformed message {str(message)[:80]!r}: expected {{'role': ..., 'content': str}}")
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"unknown message role {message.get('role')!r}")
    return messages


def _tools(args: dict) -> list[dict]:
    tools = args.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "function" in t for t in tools):
        raise ValueError("tools must be a list of OpenAI-format tool schemas")
    return tools
