"""Plans as DAGs of tool calls (LLMCompiler-style): "$N" in an argument stands for call N's result,
and calls whose inputs are ready run in parallel."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from edgeswarm.agent.steps import StepOutcome

PLACEHOLDER = re.compile(r"\$(\d+)")
MAX_PLAN_CALLS = 16
MAX_PARALLEL_CALLS = 4


class PlanError(ValueError):
    """A plan is malformed: unknown references, cycles, too many calls."""


@dataclass(frozen=True)
class PlannedCall:
    """Call `index` (1-based) of a plan, and the earlier calls whose results it uses."""

    index: int
    name: str
    arguments: dict[str, Any]
    depends_on: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.index, "tool": self.name, "arguments": self.arguments, "depends_on": list(self.depends_on)}


def parse_plan(calls: list[dict]) -> list[PlannedCall]:
    """Numbers `calls` ({"name"/"tool", "arguments"}) from 1 and finds their dependencies.

    A call may only use the results of calls before it, so every plan is acyclic.
    """
    if not isinstance(calls, list) or not calls:
        raise PlanError("a plan is a non-empty list of calls")
    if len(calls) > MAX_PLAN_CALLS:
        raise PlanError(f"a plan has at most {MAX_PLAN_CALLS} calls, got {len(calls)}")
    plan = []
    for index, call in enumerate(calls, start=1):
        if not isinstance(call, dict):
            raise PlanError(f"call {index} is not an object")
        name = call.get("name", call.get("tool"))
        arguments = call.get("arguments", {})
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise PlanError(f"call {index} needs a tool name and an arguments object")
        references = {int(number) for number in PLACEHOLDER.findall(json.dumps(arguments))}
        bad = sorted(reference for reference in references if not 1 <= reference < index)
        if bad:
            raise PlanError(f"call {index} uses ${bad[0]}, but a call may only use the results of earlier calls")
        plan.append(PlannedCall(index, name, arguments, tuple(sorted(references))))
    return plan


def substitute(arguments: Any, results: dict[int, Any]) -> Any:
    """`arguments` with each "$N" replaced by call N's result: the value itself where a string is just
    "$N", else its text."""
    if isinstance(arguments, dict):
        return {key: substitute(value, results) for key, value in arguments.items()}
    if isinstance(arguments, list):
        return [substitute(value, results) for value in arguments]
    if isinstance(arguments, str):
        whole = PLACEHOLDER.fullmatch(arguments.strip())
        if whole:
            return results[int(whole.group(1))]
        return PLACEHOLDER.sub(lambda match: _as_text(results[int(match.group(1))]), arguments)
    return arguments


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def execute_plan(plan: list[PlannedCall], run_call: Callable[[PlannedCall, dict], StepOutcome]) -> dict[int, StepOutcome]:
    """Runs every call once its dependencies succeeded, independent ones in parallel; a call whose
    dependency failed fails without running. `run_call(call, arguments)` gets the substituted arguments."""
    outcomes: dict[int, StepOutcome] = {}
    pending = {call.index: call for call in plan}
    running: dict[Future, PlannedCall] = {}
    with ThreadPoolExecutor(MAX_PARALLEL_CALLS, thread_name_prefix="plan") as pool:
        while pending or running:
            for index in sorted(pending):
                call = pending[index]
                if not all(dependency in outcomes for dependency in call.depends_on):
                    continue
                del pending[index]
                failed = [dependency for dependency in call.depends_on if not outcomes[dependency].ok]
                if failed:
                    outcomes[index] = StepOutcome(ok=False, error=f"not run: it needs the result of failed call {failed[0]}")
                    continue
                values = {dependency: outcomes[dependency].value for dependency in call.depends_on}
                running[pool.submit(run_call, call, substitute(call.arguments, values))] = call
            if not running:
                continue  # calls just failed for their dependencies; look at the rest again
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                outcomes[running.pop(future).index] = future.result()
    return outcomes
