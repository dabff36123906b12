"""The one tool-call decoding path, for every caller: an agent run's llm steps (node.llm_worker, which also
serves the SwarmAPI's agent tasks) and the OpenAI endpoint's chat completions with tools (node.openai_chat).

A caller builds the prompt with `prompt_text` or `prompt_ids`, keeps `call_room` tokens of its session for
the calls, describes the decision as a `ToolTurn` and calls `decide`: agent.constrained's decoder writes
calls (parsed, valid for their schemas) or a text answer, which is then cut at the turn's stop strings.

The conversation format the prompt teaches the model lives here too: a call is written back as
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (`call_text`) and tool results come as one
user message starting with `TOOL_RESULTS` (`results_text`). A conversation's first decision leans to
calling by a call bias (small models under-call); once tool results are in, the model decides alone
(`call_bias_for`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from edgeswarm.agent.constrained import (
    CALL_CLOSE,
    CALL_OPEN,
    DEFAULT_ANSWER_TOKENS,
    MAX_CALLS,
    SMOLLM2_CALL_BIAS,
    Decision,
    TokenStepper,
    ToolCall,
    decode_tool_calls,
    tool_prompt_text,
)
from edgeswarm.swarm.sampling import cut_at_stop

CALL_TOKENS = 96  # session room kept for each tool call a decision may write
TOOL_RESULTS = "Tool results:\n"  # how the message holding tool results starts
_RESULTS_END = "\nUse them to answer the question."


# --- the prompt, and the conversation format it teaches ---------------------------------------------


def prompt_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict]) -> str:
    """The prompt of a decision: `messages` with `tools` listed (agent.constrained.tool_prompt_text), or
    the plain chat template when there are no tools."""
    if tools:
        return tool_prompt_text(tokenizer, messages, tools)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict]) -> list[int]:
    """`prompt_text` tokenised (it holds its special tokens already)."""
    return list(tokenizer.encode(prompt_text(tokenizer, messages, tools), add_special_tokens=False))


def call_text(name: str, arguments: object) -> str:
    """A call as the model writes it, to put back in an assistant message."""
    return f"{CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{CALL_CLOSE}"


def results_text(lines: Sequence[str]) -> str:
    """The user message that gives the model tool results, one "<name> returned: ..." line each."""
    return TOOL_RESULTS + "\n".join(lines) + _RESULTS_END


def call_bias_for(messages: list[dict], bias: float) -> float:
    """`bias` for a conversation's first decision; 0 (the model decides alone) once the last message
    holds tool results."""
    return 0.0 if messages and messages[-1]["content"].startswith(TOOL_RESULTS) else bias


def call_room(max_calls: int) -> int:
    """Session tokens to keep for the calls of a decision that may make `max_calls` of them."""
    return CALL_TOKENS * max_calls


# --- the decision --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolTurn:
    """What one decision may produce."""

    tools: list[dict]  # OpenAI function tools, as listed in the prompt
    allow_answer: bool = True  # False: at least one call
    answer_only: bool = False  # a text answer although tools are listed (the prompt, and so its KV cache, stay the same)
    max_calls: int = MAX_CALLS
    max_answer_tokens: int = DEFAULT_ANSWER_TOKENS
    call_bias: float = SMOLLM2_CALL_BIAS  # logits favouring a call over an answer (see `call_bias_for`)
    stop: tuple[str, ...] = ()  # a text answer ends where one of these starts
    jump_forward: bool = True  # forced runs in one stepper call (False: one call per token, to measure it)


@dataclass(frozen=True)
class ToolOutcome:
    """A decision: `calls`, or a text `answer` cut at the first stop string (`stopped` says one was found)."""

    decision: Decision  # the decoder's own record: generated text and token ids, stepper calls (`steps`)
    answer: str | None
    stopped: bool

    @property
    def calls(self) -> list[ToolCall]:
        return self.decision.calls


def decide(stepper: TokenStepper, tokenizer: PreTrainedTokenizerBase, fed_ids: list[int], turn: ToolTurn) -> ToolOutcome:
    """Feeds `fed_ids` to `stepper` and decodes `turn`'s calls or answer.

    `fed_ids` are `prompt_ids`, or the part of them that the stepper's cache does not hold yet.
    """
    decision = decode_tool_calls(
        stepper,
        tokenizer,
        fed_ids,
        [] if turn.answer_only else turn.tools,
        allow_answer=turn.allow_answer,
        max_calls=turn.max_calls,
        max_answer_tokens=turn.max_answer_tokens,
        call_bias=turn.call_bias,
        jump_forward=turn.jump_forward,
    )
    if decision.answer is None:
        return ToolOutcome(decision, None, False)
    answer, stopped = cut_at_stop(decision.answer, turn.stop)
    return ToolOutcome(decision, answer, stopped)
