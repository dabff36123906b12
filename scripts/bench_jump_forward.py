"""Jump-forward decoding of tool calls: stepper calls, tokens per call and time, with it and without.

Every function-calling case of scripts/agent_eval_cases.json (see scripts/eval_agents.py) is decided
twice through `agent.tool_decoding.decide` with its default turn (answering allowed, SmolLM2's call bias,
at most 4 calls): with jump-forward, where forced text such as ``", "arguments": {"city": "`` reaches the
stepper in one multi-token call, and without it, one call per generated token. The two runs of a case
alternate which goes first, so that load changes hit both alike. A stepper call is a network round trip
per hop in a swarm, so stepper calls per decision are what jump-forward saves; on one process it saves
the per-call overhead of a forward pass.

    .venv/bin/python -m scripts.bench_jump_forward
    .venv/bin/python -m scripts.bench_jump_forward --backend swarm --nodes 3 --limit 12

Prints a markdown table for all decisions, those that called and those that answered, and per category
(stepper calls per decision, generated tokens per stepper call after the prompt's, seconds per decision,
and how many cases decided identically), writes
bench/results/bench_jump_forward.json and bench/results/bench_jump_forward.png (with a `_swarmN` suffix
for a swarm).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgeswarm.agent.constrained import vocab_for
from edgeswarm.agent.tool_decoding import ToolOutcome, ToolTurn, decide, prompt_ids
from devtools.evaluation import CATEGORIES, load_cases
from scripts.eval_agents import DEFAULT_CASES, StepperFactory, local_backend, select, swarm_backend

RESULTS = REPO / "bench" / "results"
MODES = {"on": True, "off": False}  # label -> ToolTurn.jump_forward


def decide_case(case: dict, tokenizer: Any, open_stepper: StepperFactory, jump_forward: bool) -> tuple[ToolOutcome, float]:
    """One decision of `case` in a fresh stepper, and its seconds."""
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": case["question"]}], case["functions"])
    turn = ToolTurn(case["functions"], jump_forward=jump_forward)
    with open_stepper(prompt) as stepper:
        began = time.perf_counter()
        outcome = decide(stepper, tokenizer, prompt, turn)
        return outcome, time.perf_counter() - began


def run_case(case: dict, tokenizer: Any, open_stepper: StepperFactory, on_first: bool) -> dict:
    """`case` decided in both modes (jump-forward first when `on_first`): their counts, and whether they agree."""
    order = list(MODES) if on_first else list(reversed(MODES))
    outcomes: dict[str, ToolOutcome] = {}
    result: dict[str, Any] = {"id": case["id"], "category": case["category"]}
    for label in order:
        outcome, seconds = decide_case(case, tokenizer, open_stepper, MODES[label])
        outcomes[label] = outcome
        decision = outcome.decision
        result[label] = {"steps": decision.steps, "fed_tokens": decision.fed_tokens, "tokens": decision.tokens, "seconds": seconds}
    on, off = outcomes["on"], outcomes["off"]
    result["is_call"] = bool(on.calls)
    result["identical"] = (on.calls, on.answer, on.decision.text, on.decision.token_ids) == (
        off.calls,
        off.answer,
        off.decision.text,
        off.decision.token_ids,
    )
    result["calls"] = [{"name": call.name, "arguments": call.arguments} for call in on.calls]
    return result


def summarize(results: list[dict]) -> dict:
    """Per mode: stepper calls per decision, generated tokens per stepper call after the prompt's, and
    seconds per decision; and how many cases decided identically in both modes."""
    row: dict[str, Any] = {"cases": len(results), "identical": sum(result["identical"] for result in results)}
    for label in MODES:
        runs = [result[label] for result in results]
        steps = sum(run["steps"] for run in runs)
        row[label] = {
            "steps_per_decision": steps / len(runs),
            "tokens_per_step": sum(run["fed_tokens"] for run in runs) / max(1, steps - len(runs)),  # each prompt took one call
            "seconds_per_decision": sum(run["seconds"] for run in runs) / len(runs),
        }
    row["fewer_steps"] = row["off"]["steps_per_decision"] / row["on"]["steps_per_decision"]
    return row


def markdown(rows: dict[str, dict], where: str) -> str:
    """The table: one line per category and mode; "fewer calls" is off's stepper calls over on's."""
    lines = [
        f"{where}; jump-forward on against off",
        "",
        "| cases | jump-forward | stepper calls / decision | fewer calls | tokens / call after the prompt | s / decision | identical outputs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        for label in MODES:
            mode = row[label]
            same = f"{row['identical']}/{row['cases']}" if label == "on" else ""
            fewer = f"{row['fewer_steps']:.2f}x" if label == "on" else ""
            lines.append(
                f"| {name} ({row['cases']}) | {label} | {mode['steps_per_decision']:.1f} | {fewer} | {mode['tokens_per_step']:.2f} | "
                f"{mode['seconds_per_decision']:.2f} | {same} |"
            )
    return "\n".join(lines)


def plot(rows: dict[str, dict], where: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    positions = range(len(names))
    width = 0.4
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for offset, label, color in ((-width / 2, "on", "tab:blue"), (width / 2, "off", "tab:gray")):
        bars = [position + offset for position in positions]
        left.bar(bars, [rows[name][label]["steps_per_decision"] for name in names], width, label=f"jump-forward {label}", color=color)
        right.bar(bars, [rows[name][label]["seconds_per_decision"] for name in names], width, label=f"jump-forward {label}", color=color)
    left.set_ylabel("stepper calls per decision")
    left.set_title("Stepper calls (round trips in a swarm)")
    right.set_ylabel("seconds per decision")
    right.set_title("Wall time")
    for axis in (left, right):
        axis.set_xticks(list(positions), names)
        axis.tick_params(axis="x", rotation=20)
    figure.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=len(MODES))
    figure.suptitle(f"Constrained tool calls, {where}")
    figure.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["local", "swarm"], default="local")
    parser.add_argument("--nodes", type=int, default=3, help="swarm size (swarm backend)")
    parser.add_argument("--model", default="default", help="the model (as given to swarm-node join)")
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES)
    parser.add_argument("--limit", type=int, default=None, help="at most K cases (taken round-robin over the categories)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (1 is fastest on a busy 2-core machine)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")

    cases = select(load_cases(args.cases), list(CATEGORIES), args.limit)
    torch.set_num_threads(args.threads)
    backend = local_backend(args.model) if args.backend == "local" else swarm_backend(args.model, args.nodes)
    with backend as (tokenizer, open_stepper, info):
        vocab_for(tokenizer)  # build the token masks before any case is timed
        decide_case(cases[0], tokenizer, open_stepper, jump_forward=True)  # warm-up
        results = []
        for index, case in enumerate(cases):
            result = run_case(case, tokenizer, open_stepper, on_first=index % 2 == 0)
            results.append(result)
            on, off = result["on"], result["off"]
            print(
                f"[{index + 1}/{len(cases)}] {case['id']}: {on['steps']} against {off['steps']} stepper calls, "
                f"{on['seconds']:.2f} against {off['seconds']:.2f} s{'' if result['identical'] else ', DIFFERENT OUTPUT'}",
                file=sys.stderr,
                flush=True,
            )
    groups = {
        "all": results,
        "called": [result for result in results if result["is_call"]],
        "answered": [result for result in results if not result["is_call"]],
    } | {name: [result for result in results if result["category"] == name] for name in CATEGORIES}
    rows = {name: summarize(group) for name, group in groups.items() if group}
    where = f"model `{info['model_id']}`, " + ("one local process" if info["backend"] == "local" else f"swarm of {info['nodes']} nodes")
    print(markdown(rows, where))

    stem = "bench_jump_forward" if args.backend == "local" else f"bench_jump_forward_swarm{args.nodes}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        **info,
        "cases_file": str(args.cases),
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
        "results": results,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(rows, where.replace("`", ""), RESULTS / f"{stem}.png")
    print(f"\nwritten to {RESULTS / stem}.json and .png")
    return report


if __name__ == "__main__":
    main()
