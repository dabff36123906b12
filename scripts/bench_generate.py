"""Decode and prefill speed: one local process against 1-, 2- and 3-node swarms on loopback.

SmolLM2-135M-Instruct in fp32, a 128-token prompt of real text (Python's own docstrings), 64 new
tokens, greedy. Both sides run the same loop: one prefill step, then one step per token, each
ending in the LM head and an argmax, so the only difference is where the blocks run.
Prints a table, writes bench/results/bench_generate.json and bench/results/bench_generate.png.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from edgeswarm import SwarmClient
from edgeswarm.model.sources import open_model
from devtools.launcher import LocalSwarm
from devtools.reference import load_reference_model

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def real_text_prompt(tokenizer, length: int) -> torch.Tensor:
    """`length` tokens of the standard library's documentation."""
    import collections
    import json as json_module
    import threading

    text = "\n\n".join(inspect.getdoc(module) or "" for module in (json_module, collections, threading, inspect))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise RuntimeError("not enough text for the prompt")
    return ids


def time_loop(step, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Runs prefill then `new_tokens - 1` decode steps; returns (prefill seconds, decode tokens/s)."""
    began = time.perf_counter()
    logits = step(prompt)
    prefill = time.perf_counter() - began
    token = logits.argmax(dim=-1, keepdim=True)
    began = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = step(token).argmax(dim=-1, keepdim=True)
    return prefill, (new_tokens - 1) / (time.perf_counter() - began)


def bench_single_process(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    cache = DynamicCache()

    @torch.inference_mode()
    def step(ids):
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]

    return time_loop(step, prompt, new_tokens)


def bench_swarm(client: SwarmClient, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    with client.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        return time_loop(session.step, prompt, new_tokens)


def even_spans(num_blocks: int, nodes: int) -> list[str]:
    cuts = [round(i * num_blocks / nodes) for i in range(nodes + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts[:-1], cuts[1:])]


def median_run(function, repeats: int) -> dict:
    runs = [function() for _ in range(repeats)]
    return {
        "prefill_s": statistics.median(run[0] for run in runs),
        "decode_tokens_per_s": statistics.median(run[1] for run in runs),
        "runs": [{"prefill_s": p, "decode_tokens_per_s": d} for p, d in runs],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["setup"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [row["decode_tokens_per_s"] for row in rows], color="tab:blue")
    left.set_ylabel("decode tokens/s")
    left.set_title("Decode speed (64 new tokens)")
    right.bar(labels, [row["prefill_s"] * 1000 for row in rows], color="tab:orange")
    right.set_ylabel("prefill ms (128 tokens)")
    right.set_title("Prefill time")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=20)
    figure.suptitle("SmolLM2-135M fp32 on loopback, 2 CPU cores")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-nodes", type=int, default=3)
    args = parser.parse_args()

    source = open_model("default")
    prompt = real_text_prompt(source.tokenizer(), args.prompt_tokens)
    rows = []

    reference = load_reference_model(source)
    bench_single_process(reference, prompt, 4)  # warm-up
    rows.append({"setup": "single process", "nodes": 0, **median_run(lambda: bench_single_process(reference, prompt, args.new_tokens), args.repeats)})

    for nodes in range(1, args.max_nodes + 1):
        spans = even_spans(source.num_blocks, nodes)
        with LocalSwarm([["--blocks", span] for span in spans]) as swarm, SwarmClient(swarm.initial_peers) as client:
            bench_swarm(client, prompt, 4)  # warm-up
            result = median_run(lambda: bench_swarm(client, prompt, args.new_tokens), args.repeats)
        rows.append({"setup": f"{nodes}-node swarm", "nodes": nodes, "spans": spans, **result})

    baseline = rows[0]["decode_tokens_per_s"]
    print(f"\nSmolLM2-135M-Instruct fp32, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'setup':<16} {'decode tok/s':>12} {'vs single':>10} {'prefill ms':>11}")
    for row in rows:
        row["decode_vs_single_process"] = row["decode_tokens_per_s"] / baseline
        print(f"{row['setup']:<16} {row['decode_tokens_per_s']:>12.2f} {row['decode_vs_single_process']:>9.2f}x {row['prefill_s'] * 1000:>11.1f}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "model": source.model_id,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }
    (RESULTS / "bench_generate.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / "bench_generate.png")
    print(f"wrote {RESULTS / 'bench_generate.json'} and bench_generate.png")


if __name__ == "__main__":
    main()
