"""BFCL-style function-calling accuracy of the constrained tool-call decoder, locally or through a swarm.

Every case of scripts/agent_eval_cases.json (see agent/evaluation.py) is decoded with
`agent.constrained.decode_tool_calls` (answering allowed, SmolLM2's call bias, at most 4 calls) and
scored like BFCL's AST checker. `--backend local` runs the whole model in this process; `--backend swarm`
starts `--nodes` real node processes on loopback, each serving ceil(blocks / nodes) blocks, and decodes
every case in a fresh inference session through them.

    .venv/bin/python -m scripts.eval_agents --backend local
    .venv/bin/python -m scripts.eval_agents --backend swarm --nodes 3 --limit 20

Reports accuracy overall and per category, decisions per second (a decision is one stepper call, i.e.
one time the model is asked: the prompt, then every point where the decoder needs the model's logits)
and mean seconds per case, as JSON (with every case's calls) and as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgeswarm.agent.constrained import (
    MAX_CALLS,
    SMOLLM2_CALL_BIAS,
    LocalStepper,
    TokenStepper,
    decode_tool_calls,
    tool_prompt,
    vocab_for,
)
from devtools.evaluation import (
    CATEGORIES,
    accuracy_by_category,
    load_cases,
    score_case,
)

DEFAULT_CASES = REPO / "scripts" / "agent_eval_cases.json"
DEFAULT_OUT = REPO / "scripts" / "results" / "eval_agents.json"
SESSION_ROOM = 256  # tokens a swarm session holds beyond the prompt

# A backend yields (tokenizer, open_stepper, info): open_stepper(prompt_ids) is a context manager giving a
# fresh TokenStepper for one case.
StepperFactory = Callable[[list[int]], Any]


@contextmanager
def local_backend(model_spec: str) -> Iterator[tuple[Any, StepperFactory, dict]]:
    """The whole model in this process; one LocalStepper, reset before every case."""
    from edgeswarm.model.sources import open_model
    from devtools.reference import load_reference_model

    source = open_model(model_spec)
    model_id = source.model_id  # read first: load_reference_model sets config.dtype, which changes the digest
    model = load_reference_model(source)
    stepper = LocalStepper(model)

    @contextmanager
    def open_stepper(prompt_ids: list[int]) -> Iterator[TokenStepper]:
        stepper.reset()
        yield stepper

    yield source.tokenizer(), open_stepper, {"model_id": model_id, "backend": "local", "nodes": 0}


@contextmanager
def swarm_backend(model_spec: str, nodes: int) -> Iterator[tuple[Any, StepperFactory, dict]]:
    """`nodes` real node processes on loopback and a SwarmClient; one inference session per case."""
    from edgeswarm import SwarmClient
    from edgeswarm.agent.steppers import SessionStepper
    from edgeswarm.model.sources import open_model
    from devtools.launcher import LocalSwarm

    num_blocks = open_model(model_spec).num_blocks
    per_node = math.ceil(num_blocks / nodes)
    node_args = [["--model", model_spec, "--num-blocks", str(per_node)]] * nodes
    began = time.perf_counter()
    print(f"starting {nodes} nodes, {per_node} of {num_blocks} blocks each", file=sys.stderr, flush=True)
    with LocalSwarm(node_args) as swarm:
        spans = [list(node.blocks) for node in swarm.nodes]
        print(f"swarm ready in {time.perf_counter() - began:.1f}s, spans {spans}", file=sys.stderr, flush=True)
        with SwarmClient(swarm.initial_peers, model=model_spec, mdns=False) as client:

            @contextmanager
            def open_stepper(prompt_ids: list[int]) -> Iterator[TokenStepper]:
                with client.inference_session(max_length=len(prompt_ids) + SESSION_ROOM) as session:
                    yield SessionStepper(session)

            info = {"model_id": client.model.model_id, "backend": "swarm", "nodes": nodes, "blocks_per_node": per_node, "spans": spans}
            yield client.tokenizer, open_stepper, info
        swarm.stop()


def run_case(case: dict, tokenizer: Any, open_stepper: StepperFactory) -> dict:
    """Decodes one case and scores it; errors (e.g. a session running out of room) count as failures."""
    messages = [{"role": "user", "content": case["question"]}]
    prompt = tool_prompt(tokenizer, messages, case["functions"])
    began = time.perf_counter()
    result: dict[str, Any] = {"id": case["id"], "category": case["category"], "prompt_tokens": len(prompt)}
    try:
        with open_stepper(prompt) as stepper:
            decision = decode_tool_calls(
                stepper,
                tokenizer,
                prompt,
                case["functions"],
                allow_answer=True,
                call_bias=SMOLLM2_CALL_BIAS,
                max_calls=MAX_CALLS,
            )
    except Exception as error:  # noqa: BLE001 - one broken case must not end the run
        result.update(ok=False, reason=f"error: {type(error).__name__}: {error}", calls=[], answer=None, steps=0, tokens=0)
    else:
        score = score_case(case, decision.calls)
        result.update(
            ok=score.ok,
            reason=score.reason,
            calls=[{"name": call.name, "arguments": call.arguments} for call in decision.calls],
            answer=decision.answer,
            steps=decision.steps,
            tokens=decision.tokens,
        )
    result["seconds"] = round(time.perf_counter() - began, 3)
    return result


def summarize(results: list[dict], info: dict, wall_seconds: float) -> dict:
    """The report: accuracy table, speed, and the run's settings."""
    seconds = sum(result["seconds"] for result in results)
    steps = sum(result["steps"] for result in results)
    return {
        **info,
        "call_bias": SMOLLM2_CALL_BIAS,
        "max_calls": MAX_CALLS,
        "cases": len(results),
        "accuracy": accuracy_by_category(results),
        "decisions": steps,
        "decisions_per_second": round(steps / seconds, 2) if seconds else 0.0,
        "mean_seconds_per_case": round(seconds / len(results), 3) if results else 0.0,
        "wall_seconds": round(wall_seconds, 1),
        "errors": sum(result["reason"].startswith("error:") for result in results),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "results": results,
    }


def markdown(report: dict) -> str:
    """The accuracy table, with the run's model, backend and speed above it."""
    where = "local" if report["backend"] == "local" else f"swarm of {report['nodes']} nodes"
    lines = [
        (
            f"model `{report['model_id']}`, backend {where}: {report['mean_seconds_per_case']:.2f} s/case, "
            f"{report['decisions_per_second']:.1f} decisions/s"
        ),
        "",
        "| category | cases | correct | accuracy |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in report["accuracy"].items():
        lines.append(f"| {name} | {row['cases']} | {row['correct']} | {row['accuracy']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["local", "swarm"], default="local")
    parser.add_argument("--nodes", type=int, default=3, help="swarm size (swarm backend)")
    parser.add_argument("--model", default="default", help="the model (as given to swarm-node join)")
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES)
    parser.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES), help="only these categories")
    parser.add_argument("--limit", type=int, default=None, help="at most K cases (taken round-robin over the categories)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (1 is fastest on a busy 2-core machine)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")

    cases = select(load_cases(args.cases), args.categories, args.limit)
    torch.set_num_threads(args.threads)
    backend = local_backend(args.model) if args.backend == "local" else swarm_backend(args.model, args.nodes)
    began = time.perf_counter()
    with backend as (tokenizer, open_stepper, info):
        vocab_for(tokenizer)  # build the token masks before any case is timed
        results = []
        for index, case in enumerate(cases, 1):
            result = run_case(case, tokenizer, open_stepper)
            results.append(result)
            mark = "ok " if result["ok"] else "BAD"
            print(f"[{index}/{len(cases)}] {mark} {result['seconds']:6.2f}s {case['id']}: {result['reason']}", file=sys.stderr, flush=True)
    report = summarize(results, info, time.perf_counter() - began)
    report["cases_file"] = str(args.cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"\nwritten to {args.out}")
    return report


def select(cases: list[dict], categories: list[str], limit: int | None) -> list[dict]:
    """Cases of `categories`; with `limit`, the first K taken in turn from each category (so every one is seen)."""
    chosen = [case for case in cases if case["category"] in categories]
    if limit is None or limit >= len(chosen):
        return chosen
    queues = [[case for case in chosen if case["category"] == name] for name in CATEGORIES]
    picked: list[dict] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return picked


if __name__ == "__main__":
    main()
