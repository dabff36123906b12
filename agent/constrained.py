"""Schema-constrained tool calls: even a 135M model emits calls that parse and match their schemas.

The model is asked (by `tool_prompt`) to answer either in plain text or with one or more calls
written as ``<tool_call>{"name": "<name>", "arguments": {...}}</tool_call>``. `decode_tool_calls`
then writes that output itself, asking the model only at *decision points* and letting it choose,
greedily, among the tokens that keep the output valid:

  * call or answer: the best logit of a token that starts ``<tool_call>`` against the best other one;
  * the function name, enum values, booleans and object keys: among the allowed texts, token by token.
    Any token spelling a prefix of an option's unwritten rest counts for it (the model may prefer
    ``calc`` to the canonical ``calcul``); options score the log-sum-exp of their tokens' logits, the
    best option's best token is written, and once one option is left its rest is forced (no step);
  * optional properties: by choosing among the keys that may come next (optional ones up to the next
    required key), or, when only optional ones are left, by the best ``,`` token against the best ``}``;
  * strings: any token whose bytes hold no quote, backslash or control character, until the model
    prefers a token that closes the string (content, then ``"``, then maybe more, such as ``",``);
  * numbers: digits (after an optional ``-``, and for `number` one ``.``) while the model's overall
    best token continues the number; arrays: ``,`` against ``]``; another call after a call: as above.

Everything else (punctuation, keys, ``<tool_call>``) is *forced*: appended as text without asking the
model. Forced text is buffered and tokenised as a whole when the model is next asked, so runs of forced
text are tokenised canonically. Chosen tokens keep their own ids, so at the seams between chosen and
forced text the tokenisation may be non-canonical; it always spells exactly the output text, which is
what the model needs. When a string ends with a token that carries text past its quote (``"}``, ``",``),
that tail is kept only if it is the start of the text forced next, which then skips it; otherwise the
token is replaced by its content and a lone quote.

Jump-forward (on by default): everything unfed when the model is next asked (the token chosen last and
the forced run after it, such as ``", "arguments": {"city": "``, a name's rest once it is the only
option left, or ``}}</tool_call>``) reaches the stepper in ONE multi-token step, whose logits are those
after its last token; in a swarm each step costs a round trip per hop. With ``jump_forward=False`` the
very same ids go one per step (the prompt still in one), as a decoder without jump-forward would feed
them: which ids are fed never depends on how they are stepped, so the model sees the same tokens and
the output is the same (up to the floating-point difference between a chunked and a token-by-token
forward pass, which changed no decision on the 68 cases of scripts/bench_jump_forward.py); only
`Decision.steps` differs.

Masks over the vocabulary (string content, digits, tokens starting with a given character, ...) are
built once per tokenizer from the tokens' bytes and cached, so a decision costs a few array operations.
They are numpy arrays, and logits are moved to numpy once per step: on a busy two-core device torch's
intra-op thread pool made each 49k-element mask operation take milliseconds, numpy takes microseconds.

Supported schema keywords: type (a list picks its first non-null type), properties, required, items,
enum, const, minItems/maxItems, minLength/maxLength, anyOf/oneOf (the first branch). Not enforced:
pattern, format, minimum/maximum (except that a minimum >= 0 forbids a sign), multipleOf, uniqueItems;
additional properties are never generated. allOf, not and $ref raise `UnsupportedSchemaError`.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_MAX_DIGITS = 15  # digits in one number, fraction included
_DEFAULT_MAX_ITEMS = 8  # items in an array whose schema sets no maxItems
_MAX_LEADING_WHITESPACE = 2  # whitespace tokens passed through before a call/answer decision
MAX_CALLS = 4  # calls in one decision, by default
DEFAULT_ANSWER_TOKENS = 128  # tokens of a text answer, by default

# A `call_bias` measured for SmolLM2-135M-Instruct with `tool_prompt`: unbiased, it almost never starts
# a call first; with +3.5 it called on 14 of 20 tool requests and answered 8 of 10 chat messages.
SMOLLM2_CALL_BIAS = 3.5

# Worded like SmolLM2's function-calling training prompt, with this module's output format. The
# placeholders are spelled out in words: a sample name such as "func_name1" gets copied by small models.
_SYSTEM_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the functions can be used, answer in plain text.
You have access to the following tools:
<tools>{tools}</tools>
The output MUST strictly adhere to the following format, and NO other text MUST be included.
<tool_call>{{"name": "the function name", "arguments": {{"the argument name": "its value"}}}}</tool_call>
(more tool calls as required, one per line)"""


class TokenStepper(Protocol):
    """Incremental decoding with a cache kept by the stepper: feed tokens, get the last position's logits."""

    def step(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # [1, n] -> [1, vocab] logits of the last position


class UnsupportedSchemaError(ValueError):
    """A tool's parameter schema uses a construct that constrained decoding cannot follow."""


class LocalStepper:
    """A `TokenStepper` over a transformers causal LM in this process, with a DynamicCache."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = DynamicCache()

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = torch.as_tensor(input_ids)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids,
                attention_mask=self._causal_mask(input_ids.shape[1]),
                past_key_values=self.cache,
                use_cache=True,
            )
        return output.logits[:, -1]

    def _causal_mask(self, new: int) -> torch.Tensor:
        """The [1, 1, new, past + new] mask of a chunk appended to the cache.

        Passed explicitly because transformers builds no mask for attention implementations it does not
        know, such as this repo's "edgeswarm_sdpa", and SDPA's own causal flag would then align a chunk
        that follows a cache as if it started at position 0.
        """
        past = self.cache.get_seq_length()
        return torch.ones(new, past + new, dtype=torch.bool).tril(diagonal=past)[None, None]

    def reset(self) -> None:
        """Forgets everything fed so far."""
        self.cache = DynamicCache()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class Decision:
    """What the model decided: `calls` (non-empty) or a plain-text `answer`."""

    calls: list[ToolCall]
    answer: str | None
    text: str  # everything generated after the prompt
    tokens: int  # generated tokens, forced ones included
    steps: int  # stepper calls, the prompt's included (its first call)
    token_ids: list[int] = field(default_factory=list)  # the generated tokens
    fed_tokens: int = 0  # how many of `token_ids` the stepper has seen (trailing forced text may be unfed)

    @property
    def is_call(self) -> bool:
        return bool(self.calls)


# --- the prompt ------------------------------------------------------------------------------------


def tool_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict]) -> list[int]:
    """Prompt ids: the chat template over `messages`, with a system message listing `tools` and the format."""
    return list(tokenizer.encode(tool_prompt_text(tokenizer, messages, tools), add_special_tokens=False))


def tool_prompt_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict]) -> str:
    """The text of `tool_prompt`, before tokenisation."""
    listing = json.dumps([tool.get("function", tool) for tool in tools])
    system = _SYSTEM_PROMPT.format(tools=listing)
    messages = list(messages)
    if messages and messages[0].get("role") == "system":
        system = f"{messages[0]['content']}\n\n{system}"
        messages = messages[1:]
    chat = [{"role": "system", "content": system}, *messages]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


# --- the vocabulary as bytes, and masks over it ------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _token_bytes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[bytes], set[int]]:
    """Each token's bytes, and the ids of special tokens.

    Byte-level BPE tokens (SmolLM2, Qwen2, Llama 3) are mapped back to bytes exactly; other tokenizers
    fall back to decoding each token alone.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = {index for index, token in added.items() if getattr(token, "special", False)}
    alphabet = _byte_level_alphabet()
    byte_level = all(char in alphabet for index, piece in enumerate(pieces) if index not in added and piece for char in piece)
    result = []
    for index, piece in enumerate(pieces):
        if index in added:
            result.append(str(added[index].content).encode())
        elif not piece:
            result.append(b"")
        elif byte_level:
            result.append(bytes(alphabet[char] for char in piece))
        else:
            result.append(tokenizer.decode([index]).encode())
    return result, special


class Vocab:
    """Token bytes and boolean masks over the vocabulary, built once per tokenizer (see `vocab_for`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.bytes, self.special_ids = _token_bytes(tokenizer)
        self.size = len(self.bytes)
        self.ids_by_bytes = {text: index for index, text in enumerate(self.bytes) if index not in self.special_ids}
        self.special = self._mask(lambda index, text: index in self.special_ids)
        self.string_body = self._mask(lambda index, text: bool(text) and _is_string_content(text) and index not in self.special_ids)
        self.quote_split = self._quote_splits()
        self.string_end = self._mask(lambda index, text: index in self.quote_split)
        self.digits = self._mask(lambda index, text: text.isdigit() and text.isascii())
        self.lead_digits = self.digits & self._mask(lambda index, text: text == b"0" or not text.startswith(b"0"))
        self.char_counts = np.array([len(text.decode("utf-8", "replace")) for text in self.bytes])
        self.whitespace = self._mask(lambda index, text: bool(text) and not text.strip() and index not in self.special_ids)
        opening = CALL_OPEN.encode()
        self.call_start = self._mask(
            lambda index, text: bool(text.lstrip()) and (opening.startswith(text.lstrip()) or text.lstrip().startswith(opening))
        )
        self._starts: dict[bytes, np.ndarray] = {}

    def _mask(self, predicate) -> np.ndarray:
        return np.array([predicate(index, text) for index, text in enumerate(self.bytes)], dtype=bool)

    def _quote_splits(self) -> dict[int, tuple[bytes, bytes]]:
        """Tokens that can close a string: valid content, a quote, anything -> (content, text after the quote)."""
        splits = {}
        for index, text in enumerate(self.bytes):
            head, quote, tail = text.partition(b'"')
            if quote and index not in self.special_ids and _is_string_content(head):
                splits[index] = (head, tail)
        return splits

    def starts_with(self, prefix: bytes) -> np.ndarray:
        """Tokens whose bytes start with `prefix` (cached per prefix)."""
        if prefix not in self._starts:
            self._starts[prefix] = self._mask(lambda index, text: text.startswith(prefix) and index not in self.special_ids)
        return self._starts[prefix]

    def token_id(self, text: bytes) -> int | None:
        return self.ids_by_bytes.get(text)


def _is_string_content(text: bytes) -> bool:
    """True when `text` may appear verbatim inside a JSON string: whole UTF-8 characters, and no quote,
    backslash or control character. (Tokens holding part of a character are left out, so the output
    always decodes to exactly the text the model was fed.)"""
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not any(byte < 0x20 or byte in (0x22, 0x5C) for byte in text)


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocab_for(tokenizer: PreTrainedTokenizerBase) -> Vocab:
    """The `Vocab` of `tokenizer`, built on first use and then cached."""
    vocab = _VOCABS.get(tokenizer)
    if vocab is None:
        vocab = _VOCABS[tokenizer] = Vocab(tokenizer)
    return vocab


# --- the writer: forced text, chosen tokens, and the stepper -----------------------------------------


class _Writer:
    """Builds the output: buffers forced text, appends chosen tokens, and steps the model only when asked."""

    def __init__(self, stepper: TokenStepper, vocab: Vocab, prompt_ids: list[int], jump_forward: bool):
        self.stepper = stepper
        self.vocab = vocab
        self.jump_forward = jump_forward
        self.out = bytearray()  # the output text so far, forced and chosen
        self.ids: list[int] = []  # generated ids (forced text tokenised when it is flushed)
        self.steps = 0
        self._unfed = list(prompt_ids)
        self._unfed_prompt = len(prompt_ids)  # how many of `_unfed` are prompt ids
        self._fed_generated = 0
        self._text = ""  # forced text not tokenised yet
        self._skip = b""  # text already emitted by a string-closing token, to drop from the next forced text
        self._logits: np.ndarray | None = None

    def force(self, text: str) -> None:
        """Appends `text` without asking the model."""
        data = text.encode()
        overlap = min(len(self._skip), len(data))
        if data[:overlap] != self._skip[:overlap]:
            raise AssertionError(f"forced {text!r} does not continue the emitted {self._skip!r}")
        self._skip, data = self._skip[overlap:], data[overlap:]
        self._text += data.decode()
        self.out += data

    def emit(self, token_id: int, skip: bytes = b"") -> None:
        """Appends a chosen token; `skip` is the part of it that the next forced text will repeat."""
        if self._skip:
            raise AssertionError(f"a token was chosen while {self._skip!r} awaited forced text")
        self._tokenize_text()
        self._append_ids([token_id])
        self.out += self.vocab.bytes[token_id]
        self._skip = skip

    def logits(self) -> np.ndarray:
        """The model's logits after everything written so far (one step for all of it with jump-forward)."""
        self._tokenize_text()
        if self._unfed:
            for chunk in self._chunks():
                logits = self.stepper.step(torch.tensor([chunk], dtype=torch.long))
                self.steps += 1
            self._logits = self._fit(logits[0].detach().float().cpu().numpy(), self.vocab.size)
            self._fed_generated = len(self.ids)
            self._unfed = []
            self._unfed_prompt = 0
        assert self._logits is not None, "logits were asked for before anything was fed"
        return self._logits

    def _chunks(self) -> list[list[int]]:
        """The unfed ids as stepper calls: all at once with jump-forward; else the prompt in one call
        and then one call per generated token."""
        if self.jump_forward:
            return [self._unfed]
        prompt, generated = self._unfed[: self._unfed_prompt], self._unfed[self._unfed_prompt :]
        return ([prompt] if prompt else []) + [[token] for token in generated]

    def pick(self, allowed: np.ndarray | None = None) -> int:
        """The id of the best token among `allowed` (all tokens when None)."""
        logits = self.logits()
        if allowed is not None:
            logits = np.where(allowed, logits, -np.inf)
        return int(logits.argmax())

    def best(self, allowed: np.ndarray) -> float:
        """The best logit among `allowed` (-inf when none is)."""
        return float(np.max(self.logits(), where=allowed, initial=-np.inf))

    def finish(self) -> None:
        """Tokenises pending forced text without feeding it (nothing more will be asked)."""
        self._tokenize_text()

    @property
    def fed_tokens(self) -> int:
        return self._fed_generated

    def _tokenize_text(self) -> None:
        if self._text:
            ids = list(self.vocab.tokenizer.encode(self._text, add_special_tokens=False))
            if b"".join(self.vocab.bytes[index] for index in ids) != self._text.encode():
                raise ValueError(f"the tokenizer does not spell {self._text!r} back exactly; it cannot be constrained")
            self._append_ids(ids)
            self._text = ""

    def _append_ids(self, ids: list[int]) -> None:
        self.ids += ids
        self._unfed += ids

    @staticmethod
    def _fit(logits: np.ndarray, size: int) -> np.ndarray:
        """`logits` over the tokenizer's vocabulary: ids the tokenizer lacks are dropped, ids the model lacks get -inf."""
        if logits.shape[0] >= size:
            return logits[:size]
        return np.concatenate([logits, np.full(size - logits.shape[0], -np.inf, dtype=logits.dtype)])


# --- choosing among fixed texts --------------------------------------------------------------------


def _prefix_tokens(vocab: Vocab, remainder: bytes) -> list[int]:
    """Ids of the tokens that spell a non-empty prefix of `remainder` ending on a character boundary."""
    ids = []
    for length in range(1, len(remainder) + 1):
        if length < len(remainder) and remainder[length] & 0xC0 == 0x80:
            continue
        token_id = vocab.token_id(remainder[:length])
        if token_id is not None:
            ids.append(token_id)
    return ids


def _choose_text(writer: _Writer, options: list[str]) -> int:
    """Writes the option the model prefers, token by token, and returns its index.

    Any token spelling a prefix of an option's unwritten rest counts for that option (not only the
    option's own tokenisation: the model may prefer `calc` to `calcul`). Each option scores the
    log-sum-exp of its tokens' logits; the best option's best token is written and the options it
    rules out are dropped. Once a single option is left, its rest is forced without asking the model.
    """
    rests = {index: option.encode() for index, option in enumerate(options) if option not in options[:index]}
    while len(rests) > 1:
        logits = writer.logits()
        finished = [index for index, rest in rests.items() if not rest]
        tokens = {index: _prefix_tokens(writer.vocab, rest) for index, rest in rests.items() if rest}
        scores = {index: float(np.logaddexp.reduce(logits[ids])) for index, ids in tokens.items() if ids}
        if not scores:
            break
        best = max(scores, key=scores.__getitem__)
        if finished and _prefers_stopping(writer, tokens):
            return finished[0]
        token_id = max(tokens[best], key=lambda index: float(logits[index]))
        writer.emit(token_id)
        spelled = writer.vocab.bytes[token_id]
        rests = {index: rest[len(spelled) :] for index, rest in rests.items() if rest and rest.startswith(spelled)}
    index, rest = next(iter(rests.items()))
    writer.force(rest.decode())
    return index


def _prefers_stopping(writer: _Writer, tokens: dict[int, list[int]]) -> bool:
    """Whether the best token continuing no option beats every token that continues one."""
    mask = np.zeros(writer.vocab.size, dtype=bool)
    for ids in tokens.values():
        mask[ids] = True
    return writer.best(~mask) > writer.best(mask)


# --- values following a schema -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Limits:
    max_string_tokens: int


def _kind(schema: dict) -> tuple[str, dict]:
    """The kind of value to write ('object', 'string', 'enum', ...) and the schema branch to follow."""
    for keyword in ("allOf", "not", "$ref"):
        if keyword in schema:
            raise UnsupportedSchemaError(f"schemas with {keyword!r} are not supported")
    for keyword in ("anyOf", "oneOf"):
        if keyword in schema:
            branches = [branch for branch in schema[keyword] if branch.get("type") != "null"] or schema[keyword]
            return _kind(branches[0])
    if "const" in schema:
        return "const", schema
    if "enum" in schema:
        return "enum", schema
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((name for name in kind if name != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind not in ("object", "array", "string", "integer", "number", "boolean", "null"):
        raise UnsupportedSchemaError(f"unknown type {kind!r}")
    return kind, schema


def _write_value(writer: _Writer, schema: dict, prefix: str, follow: str, limits: _Limits) -> None:
    """Writes `prefix` and a value valid for `schema`; `follow` is the text known to come next, or ''."""
    kind, schema = _kind(schema)
    if kind == "object":
        _write_object(writer, schema, prefix, follow, limits)
    elif kind == "array":
        _write_array(writer, schema, prefix, follow, limits)
    elif kind == "string":
        _write_string(writer, schema, prefix, follow, limits)
    elif kind in ("integer", "number"):
        _write_number(writer, schema, prefix, integer=kind == "integer")
    elif kind == "boolean":
        _choose_text(writer, [prefix + "true", prefix + "false"])
    elif kind == "null":
        writer.force(prefix + "null")
    elif kind == "const":
        writer.force(prefix + json.dumps(schema["const"]))
    else:  # enum
        options = list(dict.fromkeys(prefix + json.dumps(value) for value in schema["enum"]))
        _choose_text(writer, options)


def _write_object(writer: _Writer, schema: dict, prefix: str, follow: str, limits: _Limits) -> None:
    """Properties in schema order: required ones always, optional ones when the model chooses them."""
    properties = dict(schema.get("properties") or {})
    required = set(schema.get("required") or [])
    properties.update({key: {} for key in schema.get("required") or [] if key not in properties})
    remaining = list(properties)
    writer.force(prefix + "{")
    first = True
    while remaining:
        key = _next_key(writer, remaining, required, first)
        if key is None:
            break
        remaining = remaining[remaining.index(key) + 1 :]
        value_follow = _follow_after(remaining, required, follow)
        _write_value(writer, properties[key], " ", value_follow, limits)
        first = False
    writer.force("}")


def _next_key(writer: _Writer, remaining: list[str], required: set[str], first: bool) -> str | None:
    """Writes the separator and the next key (`"key":`), or returns None to close the object."""
    separator = "" if first else ", "
    pending_required = [key for key in remaining if key in required]
    if not pending_required:  # only optional keys left: more or close?
        more = writer.vocab.starts_with(b'"' if first else b",")
        if writer.best(writer.vocab.starts_with(b"}")) >= writer.best(more):
            return None
        candidates = remaining
    else:
        candidates = remaining[: remaining.index(pending_required[0]) + 1]
    if len(candidates) == 1:
        writer.force(separator + json.dumps(candidates[0]) + ":")
        return candidates[0]
    writer.force(separator + '"')
    chosen = _choose_text(writer, [json.dumps(key)[1:] + ":" for key in candidates])
    return candidates[chosen]


def _follow_after(remaining: list[str], required: set[str], follow: str) -> str:
    """The text certain to follow a property's value: the next key if it is required, or the closing brace."""
    if not remaining:
        return "}" + follow
    if remaining[0] in required:
        return ", " + json.dumps(remaining[0]) + ":"
    return ""


def _write_array(writer: _Writer, schema: dict, prefix: str, follow: str, limits: _Limits) -> None:
    """Items while the model prefers ',' to ']' (within minItems..maxItems)."""
    items = schema.get("items") or {}
    min_items = int(schema.get("minItems", 0))
    max_items = int(schema.get("maxItems", max(min_items, _DEFAULT_MAX_ITEMS)))
    vocab = writer.vocab
    writer.force(prefix + "[")
    count = 0
    while count < max_items:
        if count >= min_items:
            close = writer.best(vocab.starts_with(b"]"))
            more = writer.best(~vocab.starts_with(b"]") if count == 0 else vocab.starts_with(b","))
            if close >= more:
                break
        if count:
            writer.force(",")
        item_follow = "]" + follow if count + 1 == max_items else ""
        _write_value(writer, items, " " if count else "", item_follow, limits)
        count += 1
    writer.force("]")


def _write_string(writer: _Writer, schema: dict, prefix: str, follow: str, limits: _Limits) -> None:
    """A quoted string: content tokens until the model prefers a closing token (or the length cap)."""
    vocab = writer.vocab
    min_length = int(schema.get("minLength", 0))
    max_length = schema.get("maxLength")
    writer.force(prefix + '"')
    length = 0
    for _ in range(limits.max_string_tokens):
        allowed = vocab.string_body
        if max_length is not None:
            allowed = allowed & (vocab.char_counts <= int(max_length) - length)
        if length >= min_length:
            allowed = allowed | vocab.string_end
        if not bool(allowed.any()):
            break
        token_id = writer.pick(allowed)
        if token_id not in vocab.quote_split:
            writer.emit(token_id)
            length += int(vocab.char_counts[token_id])
            continue
        _close_string(writer, token_id, length, max_length, follow)
        return
    writer.force(" " * max(0, min_length - length) + '"')  # the token cap was reached


def _close_string(writer: _Writer, token_id: int, length: int, max_length: int | None, follow: str) -> None:
    """Closes a string as the chosen closing token says: its content, its quote, and its tail when the
    tail is what is forced next anyway (else the content and a lone quote are forced instead)."""
    head, tail = writer.vocab.quote_split[token_id]
    content = head.decode()
    if max_length is not None and length + len(content) > int(max_length):
        writer.force('"')
    elif follow.encode().startswith(tail):
        writer.emit(token_id, skip=tail)
    else:
        writer.force(content + '"')


def _non_negative(schema: dict) -> bool:
    """True when the schema's lower bound rules out negative numbers."""
    bounds = [schema.get("minimum"), schema.get("exclusiveMinimum")]
    return any(isinstance(bound, (int, float)) and not isinstance(bound, bool) and bound >= 0 for bound in bounds)


def _write_number(writer: _Writer, schema: dict, prefix: str, integer: bool) -> None:
    """Digits (after an optional '-') while the model's best token continues the number."""
    vocab = writer.vocab
    minus, dot = vocab.token_id(b"-"), vocab.token_id(b".")
    writer.force(prefix)
    first = vocab.lead_digits.copy()
    if minus is not None and not _non_negative(schema):
        first[minus] = True
    token_id = writer.pick(first)
    if token_id == minus:
        writer.emit(token_id)
        token_id = writer.pick(vocab.lead_digits)
    writer.emit(token_id)
    digits, leading_zero, fraction = len(vocab.bytes[token_id]), vocab.bytes[token_id] == b"0", False
    while digits < _MAX_DIGITS:
        token_id = writer.pick()
        more_digits = (not leading_zero or fraction) and bool(vocab.digits[token_id])
        starts_fraction = not integer and not fraction and dot is not None and token_id == dot
        if not (more_digits or starts_fraction):
            break
        writer.emit(token_id)
        if starts_fraction:
            fraction = True
            token_id = writer.pick(vocab.digits)
            writer.emit(token_id)
        digits += len(vocab.bytes[token_id])


# --- calls, answers, and the decision between them -----------------------------------------------------


def _pass_whitespace(writer: _Writer) -> None:
    """Emits the whitespace tokens the model wants before deciding (at most a few)."""
    for _ in range(_MAX_LEADING_WHITESPACE):
        token_id = writer.pick()
        if not bool(writer.vocab.whitespace[token_id]):
            break
        writer.emit(token_id)


def _prefers_call(writer: _Writer, bias: float = 0.0) -> bool:
    """Whether the model would rather start a `<tool_call>` than anything else (whitespace passes through).

    `bias` is added to the best logit of a token starting the call before the comparison.
    """
    vocab = writer.vocab
    _pass_whitespace(writer)
    return writer.best(vocab.call_start) + bias >= writer.best(~vocab.call_start)


def _prefers_another_call(writer: _Writer) -> bool:
    """After a call: whether the model would rather open another call than end its turn.

    Text after a call is never kept, so the choice is between a call and a special (end-of-turn) token;
    against any token, small models lose parallel calls to a sentence they would start there.
    """
    vocab = writer.vocab
    _pass_whitespace(writer)
    return writer.best(vocab.call_start) >= writer.best(vocab.special)


def _write_call(writer: _Writer, functions: dict[str, dict], limits: _Limits) -> int:
    """Writes one `<tool_call>...</tool_call>`; returns the byte offset where its JSON starts."""
    writer.force(CALL_OPEN)
    start = len(writer.out)
    writer.force('{"name": "')
    names = list(functions)
    name = names[_choose_text(writer, [json.dumps(name)[1:] + "," for name in names])]
    writer.force(' "arguments":')
    parameters = functions[name].get("parameters") or {"type": "object", "properties": {}}
    if _kind(parameters)[0] != "object":
        raise UnsupportedSchemaError(f"the parameters of {name!r} are not an object schema")
    _write_value(writer, parameters, " ", "}" + CALL_CLOSE, limits)
    writer.force("}" + CALL_CLOSE)
    return start


def _write_answer(writer: _Writer, max_tokens: int) -> str:
    """Greedy text until a special token, `max_tokens`, or the start of a `<tool_call>` (cut off).

    While the answer is still blank, tokens that would open a call are ruled out: answering was decided.
    """
    start = len(writer.out)
    for _ in range(max_tokens):
        blank = not bytes(writer.out[start:]).strip()
        token_id = writer.pick(~writer.vocab.call_start if blank else None)
        if bool(writer.vocab.special[token_id]):
            break
        writer.emit(token_id)
        if CALL_OPEN.encode() in writer.out[start:]:
            break
    text = bytes(writer.out[start:]).decode("utf-8", "replace")
    return text.split(CALL_OPEN)[0].strip()


def _parse_calls(writer: _Writer, starts: list[int]) -> list[ToolCall]:
    decoder = json.JSONDecoder()
    calls = []
    for start in starts:
        offset = len(bytes(writer.out[:start]).decode("utf-8", "replace"))
        value, _ = decoder.raw_decode(bytes(writer.out).decode("utf-8", "replace"), offset)
        calls.append(ToolCall(name=value["name"], arguments=value["arguments"]))
    return calls


def decode_tool_calls(
    stepper: TokenStepper,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    tools: list[dict],
    *,
    allow_answer: bool = True,
    max_calls: int = MAX_CALLS,
    max_string_tokens: int = 48,
    max_answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    call_bias: float = 0.0,
    jump_forward: bool = True,
) -> Decision:
    """Feeds `prompt_ids` (e.g. from `tool_prompt`) to a fresh `stepper` and decodes calls or an answer.
    (Servers decide through agent.tool_decoding, which adds stop strings and the session room for calls.)

    `tools` are OpenAI-style function definitions. Every returned call names one of them and has
    arguments valid for its `parameters` schema. With `allow_answer=False` at least one call is made.
    `call_bias` (logits) favours calling over answering at the first decision; 0 follows the model.
    `jump_forward=False` feeds the generated tokens one per stepper call (for measurement; see above).
    """
    functions = {tool["function"]["name"]: tool["function"] for tool in tools}
    if not functions and not allow_answer:
        raise ValueError("no tools to call, and answering is not allowed")
    writer = _Writer(stepper, vocab_for(tokenizer), prompt_ids, jump_forward)
    limits = _Limits(max_string_tokens=max_string_tokens)
    answer, starts = None, []
    if functions and (not allow_answer or _prefers_call(writer, call_bias)):
        starts.append(_write_call(writer, functions, limits))
        while len(starts) < max_calls and _prefers_another_call(writer):
            starts.append(_write_call(writer, functions, limits))
            if _parse_calls(writer, starts[-1:])[0] in _parse_calls(writer, starts[:-1]):
                starts.pop()  # a repeated call: the model is looping, and the calls so far are all it has
                break
    else:
        answer = _write_answer(writer, max_answer_tokens)
    writer.finish()
    return Decision(
        calls=_parse_calls(writer, starts),
        answer=answer,
        text=bytes(writer.out).decode("utf-8", "replace"),
        tokens=len(writer.ids),
        steps=writer.steps,
        token_ids=list(writer.ids),
        fed_tokens=writer.fed_tokens,
    )
