"""Schema-constrained tool calls with the real SmolLM2-135M, and with random logits for odd tokens."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from edgeswarm.agent import tool_decoding
from edgeswarm.agent.constrained import (
    CALL_CLOSE,
    CALL_OPEN,
    SMOLLM2_CALL_BIAS,
    Decision,
    LocalStepper,
    UnsupportedSchemaError,
    Vocab,
    decode_tool_calls,
    tool_prompt,
    vocab_for,
)
from edgeswarm.agent.tool_decoding import (
    ToolTurn,
    call_bias_for,
    call_text,
    prompt_ids,
    prompt_text,
    results_text,
)
from edgeswarm.swarm.sampling import cut_at_stop


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = [
    _tool("calculator", "Evaluate an arithmetic expression", {"expression": {"type": "string"}}, ["expression"]),
    _tool(
        "get_weather",
        "Get the current weather in a city",
        {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city"],
    ),
    _tool("set_alarm", "Set an alarm at a time of day", {"hour": {"type": "integer"}, "minute": {"type": "integer"}}, ["hour", "minute"]),
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}

# (request, the tool that fits it, or None when no tool does)
PROMPTS = [
    ("What is 17 * 23? Use the calculator.", "calculator"),
    ("What's the weather like in Paris?", "get_weather"),
    ("Set an alarm for 6:15 am.", "set_alarm"),
    ("How much is 1234 + 5678?", "calculator"),
    ("Is it raining in London right now? Tell me in fahrenheit.", "get_weather"),
    ("What is the temperature in Tokyo in celsius?", "get_weather"),
    ("Please set an alarm for 9 pm.", "set_alarm"),
    ("Calculate 3.5 * 12.", "calculator"),
    ("Tell me a joke.", None),
    ("Who wrote Hamlet?", None),
]


# --- an independent schema check ---------------------------------------------------------------------

_TYPE_CHECKS = {
    "string": lambda value: isinstance(value, str),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
    "null": lambda value: value is None,
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
}


def schema_errors(value, schema: dict, path: str = "$") -> list[str]:
    """JSON-schema violations of `value`, for the keywords these tests use (written apart from the decoder)."""
    if "anyOf" in schema:
        matching = [branch for branch in schema["anyOf"] if not schema_errors(value, branch, path)]
        return [] if matching else [f"{path}: {value!r} matches no anyOf branch"]
    errors = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} is not the const")
    if "enum" in schema and not any(value == option and type(value) is type(option) for option in schema["enum"]):
        errors.append(f"{path}: {value!r} is not in the enum")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPE_CHECKS[name](value) for name in types):
            return errors + [f"{path}: {value!r} is not of type {types}"]
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}: {key!r} is missing" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: {key!r} is not allowed")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            errors.append(f"{path}: {len(value)} items")
        for index, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{path}[{index}]")
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        errors.append(f"{path}: length {len(value)}")
    if _TYPE_CHECKS["number"](value) and value < schema.get("minimum", value):
        errors.append(f"{path}: {value} is below the minimum")
    return errors


def assert_calls_valid(decision: Decision, tools: list[dict]) -> None:
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    for call in decision.calls:
        assert call.name in schemas, decision.text
        assert schema_errors(call.arguments, schemas[call.name]) == [], (decision.text, schemas[call.name])


# --- random schemas ------------------------------------------------------------------------------------

_KEYS = ["title", "count", "enabled", "tags", "price", "name", "notes", "level", "mode", "ratio", "é clé", 'say "hi"', "a b"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random value schema: scalars, enums, arrays and nested objects."""
    kinds = ["string", "integer", "number", "boolean", "enum", "array", "nullable", "bounded", "const", "anyOf"]
    kind = rng.choice(kinds + ["object"] * 3 if depth < 2 else kinds)
    if kind == "object":
        return random_object(rng, depth + 1)
    if kind == "array":
        items = random_schema(rng, depth + 1) if depth < 2 else {"type": "integer"}
        return {"type": "array", "items": items, "minItems": rng.randint(0, 1), "maxItems": 3}
    if kind == "enum":
        return rng.choice([{"type": "string", "enum": ["red", "green", "blue"]}, {"enum": ["a", "ab", 1, 10, None, True]}])
    if kind == "nullable":
        return {"type": [rng.choice(["string", "integer", "boolean"]), "null"]}
    if kind == "bounded":
        return rng.choice([{"type": "string", "minLength": 2, "maxLength": 5}, {"type": "integer", "minimum": 0}])
    if kind == "const":
        return {"const": rng.choice(["fixed", 3, False])}
    if kind == "anyOf":
        return {"anyOf": [{"type": "number"}, {"type": "string"}]}
    return {"type": kind}


def random_object(rng: random.Random, depth: int = 0) -> dict:
    """A random object schema with 1 to 4 properties, some of them required."""
    properties = {key: random_schema(rng, depth) for key in rng.sample(_KEYS, rng.randint(1, 4))}
    required = [key for key in properties if rng.random() < 0.5]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def random_tools(rng: random.Random, count: int) -> list[dict]:
    return [
        {"type": "function", "function": {"name": f"tool_{index}", "description": "Stores a record", "parameters": random_object(rng)}}
        for index in range(count)
    ]


# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while this module runs: on a 2-core machine that another process keeps busy,
    two threads made each SmolLM2 step ~12x slower (threads waiting on each other), one thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(smollm):
    return smollm.tokenizer()


@pytest.fixture(scope="module")
def model(smollm_reference):
    """SmolLM2 in one process: the session's reference model (tests/conftest.py), loaded once."""
    return smollm_reference


def decide(model, tokenizer, request: str, tools: list[dict] = TOOLS, **options) -> Decision:
    prompt = tool_prompt(tokenizer, [{"role": "user", "content": request}], tools)
    return decode_tool_calls(LocalStepper(model), tokenizer, prompt, tools, **options)


class RandomStepper:
    """Random logits: drives the decoder through odd tokens that a real model would rarely pick."""

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.randn(1, self.vocab_size, generator=self.generator) * 4


class ScriptedStepper:
    """Logits that favour the next token of `script` at each step, then `end_id` (an end-of-turn token)."""

    def __init__(self, vocab_size: int, script: list[int], end_id: int):
        self.vocab_size, self.script, self.end_id = vocab_size, script, end_id
        self.steps = 0

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(1, self.vocab_size)
        logits[0, self.script[self.steps] if self.steps < len(self.script) else self.end_id] = 10.0
        self.steps += 1
        return logits


class SpyStepper:
    """Records how many tokens each step fed, and which."""

    def __init__(self, inner):
        self.inner = inner
        self.fed: list[list[int]] = []

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.fed.append(input_ids[0].tolist())
        return self.inner.step(input_ids)


class HistoryStepper:
    """Random logits that depend only on every token fed so far, not on how they were split into steps:
    a model whose answers cannot tell jump-forward from token-by-token feeding."""

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size, self.seed = vocab_size, seed
        self.fed: list[int] = []

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.fed += input_ids[0].tolist()
        generator = torch.Generator().manual_seed(hash((self.seed, *self.fed)) & 0xFFFFFFFF)
        return torch.randn(1, self.vocab_size, generator=generator) * 4


def with_and_without_jump_forward(make_stepper, tokenizer, prompt: list[int], turn: ToolTurn):
    """`turn` decided with jump-forward and without it (each on a fresh stepper, spied on)."""
    spies = [SpyStepper(make_stepper()) for _ in range(2)]
    jumped = tool_decoding.decide(spies[0], tokenizer, prompt, turn)
    stepped = tool_decoding.decide(spies[1], tokenizer, prompt, dataclasses.replace(turn, jump_forward=False))
    return (jumped, spies[0].fed), (stepped, spies[1].fed)


def assert_same_output_in_fewer_steps(jumped, stepped, prompt: list[int]) -> None:
    """Jump-forward fed the very tokens that token-by-token feeding did and decided the same, in fewer
    stepper calls when it wrote a call (an answer has no forced text: as many calls)."""
    (jumped, jumped_fed), (stepped, stepped_fed) = jumped, stepped
    assert (jumped.calls, jumped.answer, jumped.decision.text) == (stepped.calls, stepped.answer, stepped.decision.text)
    assert jumped.decision.token_ids == stepped.decision.token_ids
    assert jumped.decision.fed_tokens == stepped.decision.fed_tokens
    assert sum(jumped_fed, []) == sum(stepped_fed, [])  # the same tokens reached the model, in the same order
    assert stepped_fed[0] == prompt and all(len(ids) == 1 for ids in stepped_fed[1:])  # one token per step
    assert len(stepped_fed) == stepped.decision.steps == 1 + stepped.decision.fed_tokens
    assert len(jumped_fed) == jumped.decision.steps
    if jumped.calls:
        assert jumped.decision.steps < stepped.decision.steps
    else:
        assert jumped.decision.steps == stepped.decision.steps


# --- with SmolLM2 ----------------------------------------------------------------------------------------


def test_calculator_request_calls_the_calculator(model, tokenizer):
    decision = decide(model, tokenizer, "What is 17 * 23? Use the calculator.", allow_answer=False)
    call = decision.calls[0]
    assert call.name == "calculator"
    assert isinstance(call.arguments["expression"], str)
    assert "17" in call.arguments["expression"] and "23" in call.arguments["expression"]
    assert decision.text.startswith(CALL_OPEN)


def test_weather_request_calls_get_weather_for_paris(model, tokenizer):
    decision = decide(model, tokenizer, "What's the weather like in Paris?", allow_answer=False)
    assert decision.calls[0].name == "get_weather"
    assert decision.calls[0].arguments["city"] == "Paris"


def test_alarm_request_gets_integer_arguments(model, tokenizer):
    decision = decide(model, tokenizer, "Set an alarm for 6:15 am.", allow_answer=False)
    assert decision.calls[0].name == "set_alarm"
    assert decision.calls[0].arguments == {"hour": 6, "minute": 15}


def test_every_call_is_valid_whatever_the_model_chooses(model, tokenizer):
    right = 0
    for request, expected in PROMPTS:
        forced = decide(model, tokenizer, request, allow_answer=False, max_calls=1, max_string_tokens=16)
        assert forced.calls, f"no call for {request!r} although answering was not allowed"
        assert_calls_valid(forced, TOOLS)
        right += expected is not None and forced.calls[0].name == expected
        free = decide(model, tokenizer, request, call_bias=SMOLLM2_CALL_BIAS, max_calls=1, max_string_tokens=16, max_answer_tokens=8)
        assert_calls_valid(free, TOOLS)
        assert free.is_call != (free.answer is not None)
    assert right >= 6  # 8 of the 8 requests that fit a tool when this test was written


def test_random_schemas_give_valid_arguments(model, tokenizer):
    rng = random.Random(7)
    requests = ["Create a new record.", "Fill in the form with sensible values.", "Store: enabled, price 12.5, tags red and blue."]
    for _ in range(5):
        tools = random_tools(rng, 2)
        decision = decide(model, tokenizer, rng.choice(requests), tools, allow_answer=False, max_string_tokens=6, max_calls=2)
        assert 1 <= len(decision.calls) <= 2
        assert_calls_valid(decision, tools)


def test_forced_text_is_fed_several_tokens_per_step(model, tokenizer):
    prompt = tool_prompt(tokenizer, [{"role": "user", "content": "What's the weather like in Paris?"}], TOOLS)
    spy = SpyStepper(LocalStepper(model))
    decision = decode_tool_calls(spy, tokenizer, prompt, TOOLS, allow_answer=False)
    assert spy.fed[0][: len(prompt)] == prompt  # `<tool_call>{"name": "` is forced: it goes with the prompt
    fed_after_prompt = [token for ids in spy.fed for token in ids][len(prompt) :]
    assert fed_after_prompt == decision.token_ids[: decision.fed_tokens]
    assert max(len(ids) for ids in spy.fed[1:]) >= 5  # e.g. `weather", "arguments": {"city": "` at once
    assert len(spy.fed) == decision.steps < decision.tokens / 2
    assert tokenizer.decode(decision.token_ids) == decision.text


def test_jump_forward_decides_the_same_as_token_by_token_in_fewer_steps(model, tokenizer):
    kinds = set()
    for request, _ in PROMPTS:
        prompt = prompt_ids(tokenizer, [{"role": "user", "content": request}], TOOLS)
        jumped, stepped = with_and_without_jump_forward(lambda: LocalStepper(model), tokenizer, prompt, ToolTurn(TOOLS, max_answer_tokens=16))
        assert_same_output_in_fewer_steps(jumped, stepped, prompt)
        kinds.add(bool(jumped[0].calls))
    assert kinds == {True, False}  # calls, and answers too


def test_local_stepper_chunks_after_the_cache_match_one_forward_pass(model):
    ids = torch.arange(100, 140)[None]
    stepper = LocalStepper(model)
    stepper.step(ids[:, :25])
    chunked = stepper.step(ids[:, 25:])
    with torch.inference_mode():
        whole = model(input_ids=ids).logits[:, -1]
    assert torch.allclose(chunked, whole, atol=1e-3)


def test_masks_are_built_once_per_tokenizer(tokenizer):
    fresh = Vocab(tokenizer)
    vocab = vocab_for(tokenizer)
    assert vocab_for(tokenizer) is vocab  # built once, then cached
    assert (fresh.string_body == vocab.string_body).all()


def test_vocabulary_masks(tokenizer):
    vocab = vocab_for(tokenizer)
    text_of = {index: text for index, text in enumerate(vocab.bytes)}
    assert all(b'"' not in text_of[index] and b"\n" not in text_of[index] for index in vocab.string_body.nonzero()[0])
    assert all(text_of[index].isdigit() for index in vocab.digits.nonzero()[0])
    assert vocab.string_body[vocab.token_id(b"Paris")] and not vocab.string_body[vocab.token_id(b'",')]
    assert vocab.quote_split[vocab.token_id(b'"}')] == (b"", b"}")
    assert vocab.call_start[vocab.token_id(b"<")] and not vocab.call_start[vocab.token_id(b"The")]


def test_tool_prompt_lists_the_tools_after_a_given_system_message(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.decode(tool_prompt(tokenizer, messages, TOOLS))
    assert text.count("<|im_start|>system") == 1 and "Be brief." in text
    assert all(json.dumps(tool["function"]) in text for tool in TOOLS)
    assert text.endswith("<|im_start|>assistant\n")


# --- with random logits ----------------------------------------------------------------------------------


def test_random_logits_still_give_valid_calls(tokenizer):
    rng = random.Random(3)
    vocab_size = len(tokenizer)
    for seed in range(200):
        tools = random_tools(rng, 3)
        prompt = tokenizer.encode("Call a tool.", add_special_tokens=False)
        decision = decode_tool_calls(RandomStepper(vocab_size, seed), tokenizer, prompt, tools, allow_answer=False, max_string_tokens=8)
        assert 1 <= len(decision.calls) <= 4
        assert_calls_valid(decision, tools)


def test_random_logits_may_answer_when_allowed(tokenizer):
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    kinds = set()
    for seed in range(20):
        decision = decode_tool_calls(RandomStepper(len(tokenizer), seed), tokenizer, prompt, TOOLS, max_answer_tokens=5, call_bias=12.0)
        assert decision.is_call != (decision.answer is not None)
        assert CALL_OPEN not in (decision.answer or "")
        assert_calls_valid(decision, TOOLS)
        kinds.add(decision.is_call)
    assert kinds == {True, False}


def test_jump_forward_changes_only_the_number_of_steps_whatever_the_schema(tokenizer):
    rng = random.Random(11)
    prompt = tokenizer.encode("Call a tool.", add_special_tokens=False)
    for seed in range(30):
        turn = ToolTurn(random_tools(rng, 2), allow_answer=seed % 3 == 0, call_bias=0.0, max_answer_tokens=6)
        jumped, stepped = with_and_without_jump_forward(lambda: HistoryStepper(len(tokenizer), seed), tokenizer, prompt, turn)
        assert_same_output_in_fewer_steps(jumped, stepped, prompt)
        assert_calls_valid(jumped[0].decision, turn.tools)


def test_unsupported_schemas_are_refused(tokenizer):
    tools = [_tool("lookup", "Looks up", {"ref": {"$ref": "#/defs/thing"}}, ["ref"])]
    with pytest.raises(UnsupportedSchemaError):
        decode_tool_calls(RandomStepper(len(tokenizer), 0), tokenizer, [1, 2, 3], tools, allow_answer=False)


# --- the one decoding path (agent.tool_decoding) --------------------------------------------------------


def scripted_answer(tokenizer, text: str) -> ScriptedStepper:
    """A stepper whose model answers `text` and ends its turn."""
    return ScriptedStepper(len(tokenizer), tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id)


def test_an_answer_is_cut_where_its_first_stop_string_starts(tokenizer):
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}], TOOLS)
    turn = ToolTurn(TOOLS, call_bias=0.0, stop=("Goodbye", " world"))
    outcome = tool_decoding.decide(scripted_answer(tokenizer, "Hello world. Goodbye!"), tokenizer, prompt, turn)
    assert outcome.calls == [] and outcome.answer == "Hello" and outcome.stopped
    assert outcome.decision.answer == "Hello world. Goodbye!"  # the decoder's own record stays whole
    unstopped = tool_decoding.decide(scripted_answer(tokenizer, "Hello world. Goodbye!"), tokenizer, prompt, ToolTurn(TOOLS, call_bias=0.0, stop=("bye!!",)))
    assert unstopped.answer == "Hello world. Goodbye!" and not unstopped.stopped


def test_answer_only_turns_answer_although_the_tools_are_listed_and_the_bias_calls(tokenizer):
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}], TOOLS)
    for seed in range(5):
        called = tool_decoding.decide(RandomStepper(len(tokenizer), seed), tokenizer, prompt, ToolTurn(TOOLS, call_bias=1000.0))
        assert called.calls and called.answer is None and not called.stopped
        assert_calls_valid(called.decision, TOOLS)
        answered = tool_decoding.decide(RandomStepper(len(tokenizer), seed), tokenizer, prompt, ToolTurn(TOOLS, answer_only=True, call_bias=1000.0))
        assert answered.calls == [] and answered.answer is not None


def test_the_prompt_lists_tools_only_when_there_are_some(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    assert prompt_ids(tokenizer, messages, TOOLS) == tool_prompt(tokenizer, messages, TOOLS)
    plain = prompt_text(tokenizer, messages, [])
    assert plain == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<tools>" not in plain and "<tools>" in prompt_text(tokenizer, messages, TOOLS)


def test_the_call_bias_holds_until_tool_results_come_back():
    question = {"role": "user", "content": "What is 2 + 2?"}
    call = {"role": "assistant", "content": call_text("calculator", {"expression": "2 + 2"})}
    results = {"role": "user", "content": results_text(["calculator returned: 4"])}
    assert call_bias_for([question], SMOLLM2_CALL_BIAS) == SMOLLM2_CALL_BIAS
    assert call_bias_for([question, call, results], SMOLLM2_CALL_BIAS) == 0.0
    assert call_bias_for([question, call, results, {"role": "user", "content": "And 3 + 3?"}], SMOLLM2_CALL_BIAS) == SMOLLM2_CALL_BIAS
    written = call["content"]
    assert written.startswith(CALL_OPEN) and written.endswith(CALL_CLOSE)
    assert json.loads(written[len(CALL_OPEN) : -len(CALL_CLOSE)]) == {"name": "calculator", "arguments": {"expression": "2 + 2"}}


def test_stop_strings_cut_at_the_earliest_one_found():
    assert cut_at_stop("one two three", ["three", "two"]) == ("one ", True)
    assert cut_at_stop("one two three", ["four"]) == ("one two three", False)
    assert cut_at_stop("one two three", []) == ("one two three", False)
