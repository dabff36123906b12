"""The planners: predicted per-token time against measured, and against a memory-proportional split.

A. Model only: a heterogeneous synthetic swarm (a big but slow node, two fast ones, one fast node behind
   a slow link); predicted throughput and latency of each planner.
B. Real: 3 SmolLM2 nodes on loopback, one of them held to a fraction of a CPU by a cgroup (a slow
   device). The memory-proportional split (10/10/10) against the plan that `--partition pipeline`
   records, each measured on one greedy session; predicted per-token time comes from the nodes' own
   announced profiles. Needs root and cgroup v1's cpu controller (skipped otherwise).
Prints tables, writes bench/results/bench_planner.json and bench/results/bench_planner.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from edgeswarm import SwarmClient
from edgeswarm.model.sources import open_model
from devtools.launcher import start_node
from edgeswarm.partition.coordination import (
    participants,
    plan_key,
    profiles_from_records,
)
from edgeswarm.partition.planner import (
    Link,
    NetworkProfile,
    NodeProfile,
    Plan,
    Stage,
    evaluate_plan,
    memory_proportional_plan,
    plan_pipeline,
    plan_ring,
)
from edgeswarm.swarm import dht as swarm_dht

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
CGROUP = Path("/sys/fs/cgroup/cpu/edgeswarm-slow-node")


def synthetic_comparison() -> list[dict]:
    gib = 1 << 30
    profiles = [
        NodeProfile("big-slow", 0.008, 0.0004, 30, 16 * gib),
        NodeProfile("fast-a", 0.002, 0.0001, 12, 4 * gib),
        NodeProfile("fast-b", 0.002, 0.0001, 12, 4 * gib),
        NodeProfile("fast-far", 0.002, 0.0001, 12, 4 * gib),
    ]
    lan, slow = Link(100e6 / 8, 0.002), Link(5e6 / 8, 0.040)
    network = NetworkProfile({("fast-far", peer): slow for peer in ("client", "big-slow", "fast-a", "fast-b")}, lan)
    activation = 576 * 4
    plans = {
        "memory-proportional": memory_proportional_plan(profiles, 30, network, activation),
        "ring (memory+speed)": plan_ring(profiles, 30, network, activation),
        "pipeline, throughput": plan_pipeline(profiles, network, 30, activation, "throughput"),
        "pipeline, latency": plan_pipeline(profiles, network, 30, activation, "latency"),
    }
    baseline = plans["memory-proportional"]
    return [
        {
            "planner": name,
            "stages": [f"{s.node_id}:{s.start}-{s.end}" for s in plan.stages],
            "predicted_token_ms": plan.predicted_token_seconds * 1000,
            "predicted_throughput": plan.predicted_throughput,
            "throughput_vs_memory_split": plan.predicted_throughput / baseline.predicted_throughput,
            "latency_vs_memory_split": baseline.predicted_token_seconds / plan.predicted_token_seconds,
        }
        for name, plan in plans.items()
    ]


def slow_prefix(cpu_fraction: float) -> list[str]:
    """A command prefix that runs the node in a cgroup limited to `cpu_fraction` of one CPU.

    The period is short (10 ms) so that the limit slows every step alike; with the default 100 ms, a
    short step runs at full speed on its unused quota and only long profiling loops are slowed.
    """
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "cpu.cfs_period_us").write_text("10000")
    (CGROUP / "cpu.cfs_quota_us").write_text(str(int(10000 * cpu_fraction)))
    return ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh"]


def remove_cgroup() -> None:
    """Removes the cgroup once the slow node's processes (the node, its DHT process, p2pd) are gone."""
    deadline = time.monotonic() + 30
    while (CGROUP / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
        time.sleep(0.5)
    CGROUP.rmdir()


def measure_session(client: SwarmClient, tokens: int) -> dict:
    """Median per-token time of a greedy session, total and without the client's own head."""
    with client.inference_session(max_length=64 + tokens) as session:
        logits = session.step(torch.arange(100, 132)[None])
        totals, heads = [], []
        for _ in range(tokens):
            token = logits.argmax(dim=-1, keepdim=True)
            began = time.perf_counter()
            logits = session.step(token)
            totals.append(time.perf_counter() - began)
            began = time.perf_counter()
            client.head.logits(client.head.embed(token)[:, -1])
            heads.append(time.perf_counter() - began)
        route = [f"{hop.start}:{hop.end}" for hop in session.route]
    total, head = statistics.median(totals), statistics.median(heads)
    return {"measured_token_ms": total * 1000, "measured_pipeline_ms": (total - head) * 1000, "route": route}


def predicted(client: SwarmClient, stages_by_node: dict[str, tuple[int, int]]) -> float:
    records = [r for r in client.servers() if r.node_id in stages_by_node]
    profiles, network = profiles_from_records(records)
    stages = sorted((Stage(node, *span) for node, span in stages_by_node.items()), key=lambda stage: stage.start)
    return evaluate_plan(stages, profiles, network, 576 * 4).predicted_token_seconds * 1000


def real_layout(args_per_node: list[list[str]], slow_index: int, cpu_fraction: float, tokens: int, planned: bool) -> dict:
    nodes = []
    try:
        for index, args in enumerate(args_per_node):
            prefix = slow_prefix(cpu_fraction) if index == slow_index else ()
            nodes.append(start_node(args, nodes[0].initial_peers if nodes else (), prefix=prefix))
        last_joined = time.monotonic()
        with SwarmClient(nodes[0].initial_peers) as client:
            if planned:
                deadline = time.monotonic() + 120
                while True:
                    found = swarm_dht.fetch_value(client.dht, plan_key(client.model.model_id))
                    value = found[0] if found else None
                    spans = {(r.node_id, r.start_block, r.end_block) for r in client.servers()}
                    if value and len(value["members"]) == len(nodes):
                        plan = Plan.from_dict(value["plan"])
                        if {(s.node_id, s.start, s.end) for s in plan.stages} <= spans:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError("the nodes did not reach a plan")
                    time.sleep(1)
                stages = {s.node_id: (s.start, s.end) for s in plan.stages}
                replanned_after_join = time.monotonic() - last_joined
            else:
                stages = {r.node_id: (r.start_block, r.end_block) for r in client.servers()}
            slow_id = nodes[slow_index].info["node_id"]
            result = measure_session(client, tokens)
            result["predicted_pipeline_ms"] = predicted(client, stages)
            if planned:
                result["last_join_to_plan_followed_s"] = replanned_after_join
            result["slow_node_blocks"] = stages.get(slow_id, (0, 0))[1] - stages.get(slow_id, (0, 0))[0]
            result["profiles"] = [
                {"node": r.node_id[-8:], "decode_ms_per_block": 1000 / r.throughput, "max_blocks": r.max_blocks}
                for r in participants(client.servers(), "pipeline" if planned else "auto")
            ]
            return result
    finally:
        for node in nodes:
            node.stop()


def plot(synthetic: list[dict], real: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar([row["planner"] for row in synthetic], [row["predicted_throughput"] for row in synthetic], color="tab:green")
    left.set_ylabel("predicted tokens/s (many sessions)")
    left.set_title("Synthetic heterogeneous swarm")
    left.tick_params(axis="x", rotation=15)
    if real:
        names = list(real)
        x = range(len(names))
        right.bar([i - 0.2 for i in x], [real[n]["predicted_pipeline_ms"] for n in names], width=0.4, label="predicted")
        right.bar([i + 0.2 for i in x], [real[n]["measured_pipeline_ms"] for n in names], width=0.4, label="measured")
        right.set_xticks(list(x), names)
        right.set_ylabel("ms per token through the nodes")
        right.set_title("SmolLM2, loopback, one node CPU-limited")
        right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-fraction", type=float, default=0.25, help="CPU share of the slow node")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()

    synthetic = synthetic_comparison()
    print("\nA. synthetic swarm (big-slow 4x slower; fast-far behind 5 Mbit / 40 ms)")
    print(f"{'planner':<22} {'tok/s':>8} {'vs memory':>10} {'ms/token':>9}  stages")
    for row in synthetic:
        print(f"{row['planner']:<22} {row['predicted_throughput']:>8.1f} {row['throughput_vs_memory_split']:>9.2f}x {row['predicted_token_ms']:>9.1f}  {' '.join(row['stages'])}")

    real: dict = {}
    if not args.skip_real and Path("/sys/fs/cgroup/cpu").is_dir():
        open_model("default")  # fail early without the model
        cap = ["--num-blocks", "15", "--rebalance-period", "3", "--partition", "pipeline", "--plan-objective", "latency"]
        real["memory-proportional 10/10/10"] = real_layout([["--blocks", s] for s in ("0:10", "10:20", "20:30")], 1, args.cpu_fraction, args.tokens, planned=False)
        real["pipeline plan (latency)"] = real_layout([cap] * 3, 1, args.cpu_fraction, args.tokens, planned=True)
        print(f"\nB. SmolLM2 on loopback, node 2 limited to {args.cpu_fraction:.0%} of a CPU")
        print(f"{'layout':<30} {'predicted':>10} {'measured':>10} {'error':>7} {'slow blocks':>12} {'with head':>10}")
        for name, row in real.items():
            row["error"] = row["measured_pipeline_ms"] / row["predicted_pipeline_ms"] - 1
            print(f"{name:<30} {row['predicted_pipeline_ms']:>8.1f}ms {row['measured_pipeline_ms']:>8.1f}ms {row['error']:>+6.0%} {row['slow_node_blocks']:>12} {row['measured_token_ms']:>8.1f}ms")
        names = list(real)
        print(f"measured speed-up of the plan over the memory split: {real[names[0]]['measured_token_ms'] / real[names[1]]['measured_token_ms']:.2f}x")
        print(f"from the last node's join to every node following the new plan: {real[names[1]]['last_join_to_plan_followed_s']:.1f}s (rebalance period 3 s)")
        remove_cgroup()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_planner.json").write_text(json.dumps({"synthetic": synthetic, "real": real}, indent=2))
    plot(synthetic, real, RESULTS / "bench_planner.png")
    print(f"wrote {RESULTS / 'bench_planner.json'} and bench_planner.png")


if __name__ == "__main__":
    main()
