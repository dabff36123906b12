"""Swarms on the network-namespace testbed (scripts/testbed.sh), SmolLM2-135M-Instruct, mDNS zero-config.

A. Time for N = 2, 4, 6 hosts, all started at once with no address given, to become one swarm that
   covers every block (each host takes ceil(30/N) blocks where coverage is thinnest).
B. Prefill (128 tokens) and decode (32 tokens) speed through 3 hosts (10 blocks each) with every link
   capped at 100, 20 and 5 Mbit/s (tbf, both directions), and uncapped. The client runs in the root
   namespace and reaches the hosts over the bridge. netem is not available here: links are capped in
   bandwidth only, with no added latency.
Writes bench/results/bench_testbed.json and bench/results/bench_testbed.png. Needs root.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from edgeswarm import SwarmClient
from edgeswarm.model.sources import open_model
from devtools.launcher import start_node
from edgeswarm.partition.coverage import coverage_gaps
from devtools.testbed import Testbed, testbed_available

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def time_to_full_swarm(hosts: int) -> dict:
    blocks = math.ceil(30 / hosts)
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
                    if time.monotonic() - began > 300:
                        raise RuntimeError(f"no full swarm after 300 s: {[(r.start_block, r.end_block) for r in records]}")
                    time.sleep(0.5)
                full = time.monotonic() - began
                spans = sorted((r.start_block, r.end_block) for r in records)
        finally:
            for node in nodes:
                node.stop()
    return {"hosts": hosts, "blocks_per_host": blocks, "all_nodes_ready_s": all_ready, "full_swarm_s": full, "spans": spans}


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
    args = parser.parse_args()
    available, reason = testbed_available()
    if not available:
        raise SystemExit(f"no testbed here: {reason}")
    open_model("default")

    join = [time_to_full_swarm(hosts) for hosts in args.hosts]
    print(f"\n{'hosts':>5} {'blocks each':>11} {'all ready':>10} {'full swarm':>11}  spans")
    for row in join:
        print(f"{row['hosts']:>5} {row['blocks_per_host']:>11} {row['all_nodes_ready_s']:>9.1f}s {row['full_swarm_s']:>10.1f}s  {row['spans']}")
    links = [speed_with_cap(None if rate == "none" else rate, args.tokens) for rate in args.rates]
    print(f"\n{'link':>9} {'prefill 128':>12} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for row in links:
        print(f"{row['link']:>9} {row['prefill_128_s']:>11.2f}s {row['prefill_tokens_per_s']:>14.1f} {row['decode_tokens_per_s']:>13.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"join": join, "links": links, "tokens": args.tokens}
    (RESULTS / "bench_testbed.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / "bench_testbed.png")
    print(f"wrote {RESULTS / 'bench_testbed.json'} and bench_testbed.png")


if __name__ == "__main__":
    main()
