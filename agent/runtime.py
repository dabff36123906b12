"""Agent strategies: how a run turns its goal into steps.

- `react`: think (an llm step decides tool calls or answers), act (the calls run as tool steps, in
  parallel when there are several), observe (results go back into the context); until an answer.
- `plan`: one llm step writes the whole plan as tool calls whose arguments may use earlier results
  ("$1"); the plan runs as a DAG with independent branches in parallel; a last llm step answers.
- `team`: a planner splits the goal into sub-tasks, worker sub-agents (whole runs on other nodes) do
  them in parallel, and a critic reviews their answers and gives the final one.

Every step goes through a `RunContext` (agent.coordinator), which journals it, places it on a node and
replays its recorded result when a resumed run reaches it again. Step ids depend only on the run's
course, never on timing, so a replay meets the same ids.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from edgeswarm.agent.dag import PlanError, PlannedCall, execute_plan, parse_plan
from edgeswarm.agent.memory import ShortTermMemory
from edgeswarm.agent.steps import Step, StepFailed, StepOutcome
from edgeswarm.agent.tool_decoding import call_text, results_text
from edgeswarm.agent.vector_store import check_namespace
from edgeswarm.protocol.memory_access import MAX_ID_CHARS, MAX_TOKEN_CHARS

STRATEGIES = ("react", "plan", "team")
TOOL_CHOICES = ("auto", "required", "none")
ROLES = ("agent", "planner", "worker", "critic")
MAX_STEPS = 32
MAX_GOAL_CHARS = 4000
MAX_WORKERS = 3
MEMORY_HITS = 3
CONTEXT_TOKENS = 6000  # of the model's 8192, leaving room for the tool listing and the answer
OBSERVATION_CHARS = 600  # a tool result is cut to this many characters in the model's context

MEMORY_SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "memory_search",
        "description": "Search your long-term memory for facts about a topic.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to look for."}},
            "required": ["query"],
        },
    },
}

ASSIGN_TOOL = {
    "type": "function",
    "function": {
        "name": "assign",
        "description": "Give one self-contained sub-task of the goal to a worker.",
        "parameters": {
            "type": "object",
            "properties": {"task": {"type": "string", "description": "The sub-task, as a full question."}},
            "required": ["task"],
        },
    },
}

ROLE_PROMPTS = {
    "agent": "You are a helpful assistant. Use the tools when they help, then answer briefly.",
    "worker": "You are a worker agent. Do your task, using the tools when they help, then answer briefly.",
    "planner": "You are a planner. Split the user's goal into at most three independent sub-tasks and assign each one.",
    "critic": "You are a critic. Check the workers' answers against the goal and give the final answer in one or two sentences.",
}
PLAN_HINT = "Make a plan: call every tool needed. A call may use the result of call N by writing $N in an argument."


@dataclass(frozen=True)
class RunSpec:
    """What a run is asked to do, and within which limits."""

    goal: str
    tools: list[str] | None = None  # tool names the run may call; None: every tool in the swarm
    memory_namespace: str | None = None  # long-term memory to read facts from and remember the answer in
    memory_owner: str | None = None  # the principal id that owns the namespace (with a namespace)
    memory_access: str | None = None  # the owner's token (protocol.memory_access) for the run's memory steps
    max_steps: int = 8  # llm decisions (react) before an answer is forced
    strategy: str = "react"
    plan: list[dict] | None = None  # for "plan": the calls to run, instead of asking the model for them
    role: str = "agent"
    remember: bool = True  # write the goal and answer to memory at the end (with a namespace)
    max_answer_tokens: int = 96
    tool_choice: str = "auto"  # as OpenAI's: "auto", "required" (the first decision must call), "none"
    parent: str | None = None  # the run that spawned this one as a sub-agent

    def __post_init__(self) -> None:
        if not isinstance(self.goal, str) or not self.goal.strip():
            raise ValueError("the goal must be a non-empty string")
        if len(self.goal) > MAX_GOAL_CHARS:
            raise ValueError(f"the goal has {len(self.goal)} characters; at most {MAX_GOAL_CHARS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if self.tool_choice not in TOOL_CHOICES:
            raise ValueError(f"unknown tool_choice {self.tool_choice!r}; expected one of {TOOL_CHOICES}")
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")
        if not isinstance(self.max_steps, int) or not 1 <= self.max_steps <= MAX_STEPS:
            raise ValueError(f"max_steps must be an int in [1, {MAX_STEPS}], got {self.max_steps!r}")
        if self.memory_namespace is not None:
            check_namespace(self.memory_namespace)
            if not (isinstance(self.memory_owner, str) and 0 < len(self.memory_owner) <= MAX_ID_CHARS):
                raise ValueError("a run with a memory namespace needs memory_owner, the principal id that owns it")
            if not (isinstance(self.memory_access, str) and 0 < len(self.memory_access) <= MAX_TOKEN_CHARS):
                raise ValueError("a run with a memory namespace needs memory_access, its owner's access token")
        elif self.memory_owner is not None or self.memory_access is not None:
            raise ValueError("memory_owner and memory_access go with a memory_namespace")
        if self.tools is not None and not (isinstance(self.tools, list) and all(isinstance(t, str) for t in self.tools)):
            raise ValueError("tools must be a list of tool names")
        if self.plan is not None:
            parse_plan(self.plan)  # raises PlanError, a ValueError

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any) -> RunSpec:
        if not isinstance(value, dict):
            raise ValueError("a run spec is a JSON object")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown run spec fields {sorted(unknown)}")
        try:
            return cls(**value)
        except TypeError as error:
            raise ValueError(f"malformed run spec: {error}") from error


class RunContext(Protocol):
    """What a strategy needs from its coordinator."""

    spec: RunSpec
    run_id: str

    def step(self, step: Step) -> StepOutcome: ...  # journaled, placed, replayed on resume

    def emit(self, event: dict) -> None: ...

    def tool_schemas(self) -> list[dict]: ...  # the tools this run may call, OpenAI format

    def tool_is_idempotent(self, name: str) -> bool: ...


class Conversation:
    """A run's short-term memory: the messages its llm steps see (trimmed, oldest turns first, beyond
    `CONTEXT_TOKENS`), and the node that holds their KV prefix."""

    def __init__(self, system: str, user: str):
        self.memory = ShortTermMemory(max_tokens=CONTEXT_TOKENS, system=system)
        self.memory.add("user", user)
        self.llm_node: str | None = None

    def add(self, role: str, content: str) -> None:
        self.memory.add(role, content)

    @property
    def messages(self) -> list[dict]:
        return self.memory.as_messages()


# --- shared pieces ---------------------------------------------------------------------------------


def run_agent(ctx: RunContext) -> dict[str, Any]:
    """Runs `ctx.spec` to its end; returns {"answer": ...} plus what the strategy adds."""
    spec = ctx.spec
    strategy = {"react": react, "plan": plan_and_execute, "team": team}[spec.strategy]
    answer = strategy(ctx)
    ctx.emit({"type": "answer", "text": answer})
    if spec.memory_namespace and spec.remember and answer:
        args = memory_args(spec, text=f"{spec.goal} {answer}", record_id=_record_id(ctx.run_id))
        ctx.step(Step("memory.write", "memory.write", args))
    return {"answer": answer, "strategy": spec.strategy}


def memory_args(spec: RunSpec, **args: Any) -> dict[str, Any]:
    """The arguments of a memory step on the run's namespace: whose it is, and the token that opens it."""
    return {"owner": spec.memory_owner, "namespace": spec.memory_namespace, "access": spec.memory_access, **args}


def _record_id(run_id: str) -> str:
    return "run-" + "".join(c if c.isalnum() or c in "_.:-" else "-" for c in run_id)[:120]


def recall(ctx: RunContext, conversation: Conversation) -> None:
    """Reads the run's memory namespace about its goal (a memory.search step) and, if anything is found,
    adds it to the conversation as a memory_search call and its result: small models use facts given as
    tool results far better than facts in the system prompt."""
    spec = ctx.spec
    if not spec.memory_namespace:
        return
    outcome = ctx.step(Step("memory.read", "memory.search", memory_args(spec, query=spec.goal, k=MEMORY_HITS)))
    if not outcome.ok or not outcome.value.get("hits"):
        return
    call = {"name": "memory_search", "arguments": {"query": spec.goal}}
    conversation.add("assistant", call_text(call["name"], call["arguments"]))
    conversation.add("user", observation([call], [outcome]))


def start_conversation(ctx: RunContext, role: str, extra: str = "") -> Conversation:
    system = ROLE_PROMPTS[role] + (f"\n{extra}" if extra else "")
    conversation = Conversation(system, ctx.spec.goal)
    recall(ctx, conversation)
    return conversation


def think(ctx: RunContext, conversation: Conversation, step_id: str, tools: list[dict], **options) -> dict:
    """An llm step on the conversation, kept on the node that holds its KV prefix; raises StepFailed."""
    args = {"messages": conversation.messages, "tools": tools, "max_answer_tokens": ctx.spec.max_answer_tokens, **options}
    outcome = ctx.step(Step(step_id, "llm", args, prefer_node=conversation.llm_node))
    if not outcome.ok:
        raise StepFailed(f"{step_id} failed: {outcome.error}")
    conversation.llm_node = outcome.node_id
    return outcome.value


def available_tools(ctx: RunContext) -> list[dict]:
    if ctx.spec.tool_choice == "none":
        return []
    tools = ctx.tool_schemas()
    if ctx.spec.memory_namespace:
        tools = [*tools, MEMORY_SEARCH_TOOL]
    return tools


def call_tool(ctx: RunContext, step_id: str, name: str, arguments: dict) -> StepOutcome:
    """One tool call as a step: memory_search goes to the run's memory, anything else to a node hosting it."""
    if name == "memory_search" and ctx.spec.memory_namespace:
        query = str(arguments.get("query", ""))[:1000] or ctx.spec.goal
        return ctx.step(Step(step_id, "memory.search", memory_args(ctx.spec, query=query, k=MEMORY_HITS)))
    idempotent = ctx.tool_is_idempotent(name)
    return ctx.step(Step(step_id, "tool", {"name": name, "arguments": arguments}, idempotent=idempotent))


def call_tools(ctx: RunContext, prefix: str, calls: list[dict]) -> list[StepOutcome]:
    """Runs one decision's calls, in parallel when there are several (ids `prefix.call1`, ...)."""
    if len(calls) == 1:
        return [call_tool(ctx, f"{prefix}.call1", calls[0]["name"], calls[0]["arguments"])]
    with ThreadPoolExecutor(len(calls), thread_name_prefix="calls") as pool:
        futures = [
            pool.submit(call_tool, ctx, f"{prefix}.call{index}", call["name"], call["arguments"])
            for index, call in enumerate(calls, start=1)
        ]
        return [future.result() for future in futures]


def observation(calls: list[dict], outcomes: list[StepOutcome]) -> str:
    """The tool results as the model reads them next."""
    lines = []
    for call, outcome in zip(calls, outcomes, strict=True):
        shown = _shown(outcome.value) if outcome.ok else f"error: {outcome.error}"
        lines.append(f"{call['name']} returned: {shown[:OBSERVATION_CHARS]}")
    return results_text(lines)


def _shown(value: Any) -> str:
    if isinstance(value, dict) and "hits" in value:
        return "; ".join(hit["text"] for hit in value["hits"]) or "nothing found"
    return value if isinstance(value, str) else json.dumps(value)


def final_answer(ctx: RunContext, conversation: Conversation, step_id: str, tools: list[dict]) -> str:
    """An llm step that must answer in text (same prompt and tools listed, so the KV prefix is reused)."""
    decision = think(ctx, conversation, step_id, tools, answer_only=True)
    return (decision.get("answer") or decision.get("text") or "").strip()


# --- strategies ------------------------------------------------------------------------------------


def react(ctx: RunContext) -> str:
    """Think, act, observe, until the model answers or `max_steps` decisions were made."""
    conversation = start_conversation(ctx, ctx.spec.role)
    tools = available_tools(ctx)
    seen = set()
    for turn in range(1, ctx.spec.max_steps + 1):
        if turn == 1:  # the first decision leans to calling (small models under-call), or must call
            options = {"allow_answer": not (tools and ctx.spec.tool_choice == "required")}
        else:
            options = {"call_bias": 0.0}
        decision = think(ctx, conversation, f"think{turn}", tools, **options)
        calls = decision["calls"]
        if not calls:
            return (decision.get("answer") or "").strip()
        outcomes = call_tools(ctx, f"act{turn}", calls)
        conversation.add("assistant", decision["text"])
        conversation.add("user", observation(calls, outcomes))
        key = json.dumps(calls, sort_keys=True)
        if key in seen:  # repeating itself: answer with what it has
            break
        seen.add(key)
    return final_answer(ctx, conversation, "answer", tools)


def plan_and_execute(ctx: RunContext) -> str:
    """Plan every call up front, run the plan as a DAG, then answer from all results."""
    conversation = start_conversation(ctx, ctx.spec.role, PLAN_HINT)
    tools = available_tools(ctx)
    if ctx.spec.plan is not None:
        calls = ctx.spec.plan
        text = json.dumps(calls)
    else:
        decision = think(ctx, conversation, "plan", tools, allow_answer=False)
        calls, text = decision["calls"], decision["text"]
    try:
        plan = parse_plan(calls)
    except PlanError as error:
        raise StepFailed(f"the plan is unusable: {error}") from error
    ctx.emit({"type": "plan", "calls": [call.to_dict() for call in plan]})

    def run_call(call: PlannedCall, arguments: dict) -> StepOutcome:
        return call_tool(ctx, f"plan.call{call.index}", call.name, arguments)

    outcomes = execute_plan(plan, run_call)
    ordered = [outcomes[call.index] for call in plan]
    conversation.add("assistant", text)
    conversation.add("user", observation([{"name": call.name} for call in plan], ordered))
    return final_answer(ctx, conversation, "answer", tools)


def team(ctx: RunContext) -> str:
    """A planner assigns sub-tasks, worker sub-agents run them in parallel, a critic answers."""
    spec = ctx.spec
    planner = Conversation(ROLE_PROMPTS["planner"], spec.goal)
    decision = think(ctx, planner, "planner", [ASSIGN_TOOL], allow_answer=False, max_calls=MAX_WORKERS)
    tasks = list(dict.fromkeys(call["arguments"]["task"].strip() for call in decision["calls"] if call["arguments"]["task"].strip()))
    tasks = tasks[:MAX_WORKERS] or [spec.goal]
    for index, task in enumerate(tasks, start=1):
        ctx.emit({"type": "message", "from": "planner", "to": f"worker{index}", "content": task})

    def work(index: int, task: str) -> StepOutcome:
        child = RunSpec(
            goal=task,
            tools=spec.tools,
            memory_namespace=spec.memory_namespace,
            memory_owner=spec.memory_owner,
            memory_access=spec.memory_access,
            max_steps=min(spec.max_steps, 4),
            role="worker",
            remember=False,
            max_answer_tokens=spec.max_answer_tokens,
            parent=ctx.run_id,
        )
        return ctx.step(Step(f"worker{index}", "subagent", child.to_dict()))

    with ThreadPoolExecutor(len(tasks), thread_name_prefix="workers") as pool:
        outcomes = list(pool.map(work, range(1, len(tasks) + 1), tasks))
    reports = []
    for index, (task, outcome) in enumerate(zip(tasks, outcomes, strict=True), start=1):
        answer = outcome.value.get("answer", "") if outcome.ok else f"(failed: {outcome.error})"
        ctx.emit({"type": "message", "from": f"worker{index}", "to": "critic", "content": answer})
        reports.append(f"Worker {index} was asked: {task}\nWorker {index} answered: {answer}")
    critic = Conversation(ROLE_PROMPTS["critic"], f"Goal: {spec.goal}\n\n" + "\n\n".join(reports))
    answer = final_answer(ctx, critic, "critic", [])
    ctx.emit({"type": "message", "from": "critic", "to": "user", "content": answer})
    return answer
