"""Swarms on the network-namespace testbed (scripts/testbed.sh), SmolLM2-135M-Instruct, mDNS zero-config.

A. Time for N = 2, 4, 6 hosts, all started at once with no address given, to become one swarm that
   covers every block (each host takes ceil(30/N) blocks where coverage is thinnest).
B. Prefill (128 tokens) and decode (32 tokens) speed through 3 hosts (10 blocks each) with every link
   capped at 100, 20 and 5 Mbit/s (tbf, both directions), and uncapped. The client runs in the root
   namespace and reaches the hosts over the bridge. netem is not available here: links are capped in
   bandwidth only, with no added latency.
C. With --convergence-runs R (instead of A and B): R times over, 3 hosts started at the same moment
   (--host given, 10 blocks each, found by one another over mDNS, default rebalancing period), timed
   from the launch until a client sees every block covered; a table of the runs with min/median/max.
Writes bench/results/bench_testbed.json and bench/results/bench_testbed.png (A and B), or
bench/results/bench_testbed_convergence.json and .png (C). Needs root.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from devtools.launcher import NodeProcess, start_node
from devtools.testbed import Testbed, testbed_available
from edgeswarm import SwarmClient
from edgeswarm.model.sources import open_model
from edgeswarm.partition.coverage import coverage_gaps

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
MODEL_BLOCKS = 30  # SmolLM2-135M's transformer blocks
CONVERGENCE_HOSTS = 3
CONVERGENCE_TARGET_S = 30.0  # what the convergence runs should stay under (the bound)
FULL_SWARM_TIMEOUT_S = 300.0
POLL_S = 0.5


def time_to_full_swarm(hosts: int) -> dict:
    blocks = math.ceil(MODEL_BLOCKS / hosts)
    with Testbed(hosts, force=True) as testbed:
        began = time.monotonic()

        def launch(host: int):
            return start_node(
                ["--num-blocks", str(blocks), "--rebalance-period", "5"],
                prefix=testbed.exec_args(host, []), host=testbed.host_ip(host), mdns=True, timeout=300,
            )

        with ThreadPoolExecutor(hosts) as pool:
            nodes = list(pool.map(launch, testbed.hosts()))
        all_ready = time.monotonic() - began
        try:
            with SwarmClient(nodes[0].initial_peers, mdns=False) as client:
                while True:
                    records = client.servers()
                    if len(records) == hosts and not coverage_gaps(records, client.model.num_blocks):
                        break
                    if time.monotonic() - began > FULL_SWARM_TIMEOUT_S:
                        raise RuntimeError(f"no full swarm after {FULL_SWARM_TIMEOUT_S:.0f} s: {[(r.start_block, r.end_block) for r in records]}")
                    time.sleep(POLL_S)
                full = time.monotonic() - began
                spans = sorted((r.start_block, r.end_block) for r in records)
        finally:
            for node in nodes:
                node.stop()
    return {"hosts": hosts, "blocks_per_host": blocks, "all_nodes_ready_s": all_ready, "full_swarm_s": full, "spans": spans}


def time_to_full_coverage(testbed: Testbed) -> dict:
    """Starts a node on every host of `testbed` at once and times, from the launch, until a client (in
    the root namespace, joined through the first node ready) sees every block served; also when the
    last node was ready, and how many rebalancing moves that took."""
    blocks = math.ceil(MODEL_BLOCKS / testbed.n)
    began = time.monotonic()

    def launch(host: int) -> tuple[NodeProcess, float]:
        node = start_node(
            ["--num-blocks", str(blocks)], prefix=testbed.exec_args(host, []), host=testbed.host_ip(host), mdns=True, timeout=FULL_SWARM_TIMEOUT_S
        )
        return node, time.monotonic() - began

    with ThreadPoolExecutor(testbed.n) as pool:
        launches = [pool.submit(launch, host) for host in testbed.hosts()]
        try:
            first, _ = next(as_completed(launches)).result()
            with SwarmClient(first.initial_peers, mdns=False) as client:
                while True:
                    records = client.servers()
                    if not coverage_gaps(records, client.model.num_blocks):
                        break
                    if time.monotonic() - began > FULL_SWARM_TIMEOUT_S:
                        raise RuntimeError(f"no full coverage after {FULL_SWARM_TIMEOUT_S:.0f} s: {[(r.start_block, r.end_block) for r in records]}")
                    time.sleep(POLL_S)
                full = time.monotonic() - began
            nodes, ready = zip(*(launch.result() for launch in launches))
        finally:
            for launch in launches:
                if launch.exception() is None:  # (waits for the launch to end)
                    launch.result()[0].stop()
    moves = sum(line.startswith("moved from blocks") for node in nodes for line in node.output)
    return {"ready_s": max(ready), "full_coverage_s": full, "spans": sorted((r.start_block, r.end_block) for r in records), "moves": moves}


def convergence(runs: int) -> dict:
    """`runs` simultaneous starts of CONVERGENCE_HOSTS hosts, each on a fresh swarm (one testbed for all)."""
    rows = []
    load_before = os.getloadavg()[1]  # the machine's 5-minute load: other work slows the nodes' start-up
    with Testbed(CONVERGENCE_HOSTS) as testbed:
        for run in range(1, runs + 1):
            rows.append({"run": run, **time_to_full_coverage(testbed)})
            print(f"run {run}: full coverage after {rows[-1]['full_coverage_s']:.1f} s, spans {rows[-1]['spans']}", flush=True)
    times = [row["full_coverage_s"] for row in rows]
    return {
        "hosts": CONVERGENCE_HOSTS,
        "blocks_per_host": math.ceil(MODEL_BLOCKS / CONVERGENCE_HOSTS),
        "runs": rows,
        "min_s": min(times),
        "median_s": statistics.median(times),
        "max_s": max(times),
        "load_average": [load_before, os.getloadavg()[1]],
    }


def plot_convergence(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    runs = report["runs"]
    positions = range(len(runs))
    width = 0.4
    axis.bar([x - width / 2 for x in positions], [row["ready_s"] for row in runs], width, color="tab:gray", label="last node ready")
    axis.bar([x + width / 2 for x in positions], [row["full_coverage_s"] for row in runs], width, color="tab:blue", label="full coverage")
    axis.set_xticks(list(positions), [str(row["run"]) for row in runs])
    axis.axhline(report["median_s"], color="tab:green", linestyle="--", label=f"median full coverage {report['median_s']:.1f} s")
    axis.axhline(CONVERGENCE_TARGET_S, color="tab:red", linestyle=":", label=f"target {CONVERGENCE_TARGET_S:.0f} s")
    axis.set_xlabel("run")
    axis.set_ylabel("seconds from the launch")
    axis.set_title(f"{report['hosts']} hosts started at once ({report['blocks_per_host']} blocks each, SmolLM2-135M)")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def speed_with_cap(rate: str | None, tokens: int) -> dict:
    with Testbed(3, rate=rate, force=True) as testbed:
        nodes = []
        try:
            for host, span in zip(testbed.hosts(), ("0:10", "10:20", "20:30")):
                peers = nodes[0].initial_peers if nodes else ()
                nodes.append(start_node(["--blocks", span], peers, prefix=testbed.exec_args(host, []), host=testbed.host_ip(host), timeout=300))
            with SwarmClient(nodes[0].initial_peers, mdns=False) as client:
                prompt = torch.arange(1000, 1128)[None]
                with client.inference_session(max_length=256) as session:
                    began = time.perf_counter()
                    logits = session.step(prompt)
                    prefill = time.perf_counter() - began
                    steps = []
                    for _ in range(tokens):
                        began = time.perf_counter()
                        logits = session.step(logits.argmax(dim=-1, keepdim=True))
                        steps.append(time.perf_counter() - began)
        finally:
            for node in nodes:
                node.stop()
    return {
        "link": rate or "uncapped",
        "prefill_128_s": prefill,
        "prefill_tokens_per_s": 128 / prefill,
        "decode_tokens_per_s": 1 / statistics.median(steps),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 4))
    joins = report["join"]
    left.bar([str(row["hosts"]) for row in joins], [row["full_swarm_s"] for row in joins], color="tab:blue")
    left.set_xlabel("hosts started at once")
    left.set_ylabel("seconds to a full swarm")
    left.set_title("Zero-config start (mDNS)")
    links = report["links"]
    labels = [row["link"] for row in links]
    middle.bar(labels, [row["decode_tokens_per_s"] for row in links], color="tab:green")
    middle.set_ylabel("decode tokens/s")
    middle.set_title("Decode, 3 hosts")
    right.bar(labels, [row["prefill_tokens_per_s"] for row in links], color="tab:orange")
    right.set_ylabel("prefill tokens/s (128-token prompt)")
    right.set_title("Prefill, 3 hosts")
    figure.suptitle("SmolLM2-135M fp32 on network-namespace hosts (tbf caps, no added latency)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="*", default=[2, 4, 6])
    parser.add_argument("--rates", nargs="*", default=["none", "100mbit", "20mbit", "5mbit"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--convergence-runs", type=int, metavar="R", help="only time R simultaneous starts of 3 hosts (C)")
    args = parser.parse_args()
    available, reason = testbed_available()
    if not available:
        raise SystemExit(f"no testbed here: {reason}")
    open_model("default")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.convergence_runs:
        report = convergence(args.convergence_runs)
        print(f"\n{'run':>3} {'all ready':>10} {'full coverage':>14} {'moves':>5}  spans")
        for row in report["runs"]:
            print(f"{row['run']:>3} {row['ready_s']:>9.1f}s {row['full_coverage_s']:>13.1f}s {row['moves']:>5}  {row['spans']}")
        print(f"min {report['min_s']:.1f} s, median {report['median_s']:.1f} s, max {report['max_s']:.1f} s"
              f" (5-minute load average {report['load_average'][0]:.1f} before, {report['load_average'][1]:.1f} after, {os.cpu_count()} CPUs)")
        (RESULTS / "bench_testbed_convergence.json").write_text(json.dumps(report, indent=2))
        plot_convergence(report, RESULTS / "bench_testbed_convergence.png")
        print(f"wrote {RESULTS / 'bench_testbed_convergence.json'} and bench_testbed_convergence.png")
        return

    join = [time_to_full_swarm(hosts) for hosts in args.hosts]
    print(f"\n{'hosts':>5} {'blocks each':>11} {'all ready':>10} {'full swarm':>11}  spans")
    for row in join:
        print(f"{row['hosts']:>5} {row['blocks_per_host']:>11} {row['all_nodes_ready_s']:>9.1f}s {row['full_swarm_s']:>10.1f}s  {row['spans']}")
    links = [speed_with_cap(None if rate == "none" else rate, args.tokens) for rate in args.rates]
    print(f"\n{'link':>9} {'prefill 128':>12} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for row in links:
        print(f"{row['link']:>9} {row['prefill_128_s']:>11.2f}s {row['prefill_tokens_per_s']:>14.1f} {row['decode_tokens_per_s']:>13.2f}")
    report = {"join": join, "links": links, "tokens": args.tokens}
    (RESULTS / "bench_testbed.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / "bench_testbed.png")
    print(f"wrote {RESULTS / 'bench_testbed.json'} and bench_testbed.png")


if __name__ == "__main__":
    main()
