"""Compressed links on slow edge links: a 512-token prefill through 3 testbed hosts capped at 5 Mbit/s.

Three network-namespace hosts (scripts/testbed.sh) serve SmolLM2-135M-Instruct blocks 0:10, 10:20 and
20:30, each host's link capped (tbf, both directions); the client runs in the root namespace. For each
link-quality budget, the client measures its links once (a warm-up session), then prefills a 512-token
prompt of real text and decodes 16 tokens. The budget `lossless` sends float32 as it is; the others let the
client choose the fastest codec they allow for each link and step (protocol.link_policy).
Writes bench/results/bench_links.json and bench/results/bench_links.png. Needs root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from edgeswarm import SwarmClient
from edgeswarm.model.calibration import load_or_fit_basis, module_docs_text
from edgeswarm.model.sources import open_model
from edgeswarm.protocol.constants import PREFILL_CHUNK_TOKENS
from devtools.launcher import start_node
from devtools.testbed import Testbed, testbed_available

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
BUDGETS = ("lossless", "high", "balanced", "max")


def run_budget(peers: list[str], budget: str, prompt: torch.Tensor, new_tokens: int) -> dict:
    with SwarmClient(peers, mdns=False, link_quality=budget) as client:
        with client.inference_session(max_length=1024) as warm_up:  # measures every link once
            warm_up.step(prompt[:, :16])
            warm_up.step(prompt[:, 16:17])
        with client.inference_session(max_length=1024) as session:
            began = time.perf_counter()
            logits = session.step(prompt)
            prefill = time.perf_counter() - began
            prefill_bytes = session.link_bytes
            tokens, steps = [int(logits[0].argmax())], []
            for _ in range(new_tokens - 1):
                began = time.perf_counter()
                logits = session.step(torch.tensor([[tokens[-1]]]))
                steps.append(time.perf_counter() - began)
                tokens.append(int(logits[0].argmax()))
            prefill_codecs = sorted({client.links.for_step(hop, 1, PREFILL_CHUNK_TOKENS).request or "none" for hop in session.route})
            decode_codecs = sorted({client.links.for_step(hop, 1, 1).request or "none" for hop in session.route})
            bandwidths = [client.links.bandwidth(hop.record) for hop in session.route]
    return {
        "budget": budget,
        "prefill_512_s": prefill,
        "prefill_link_bytes": prefill_bytes,
        "decode_tokens_per_s": 1 / statistics.median(steps),
        "tokens": tokens,
        "prefill_codecs": prefill_codecs,
        "decode_codecs": decode_codecs,
        "measured_link_mbit": [8 * b / 1e6 for b in bandwidths],
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{row['budget']}\n{','.join(row['prefill_codecs'])}" for row in rows]
    left.bar(labels, [row["prefill_512_s"] for row in rows], color="tab:orange")
    left.set_ylabel("seconds")
    left.set_title(f"512-token prefill, 3 hosts, {report['rate']} links")
    right.bar(labels, [row["prefill_link_bytes"] / 1e6 for row in rows], color="tab:blue")
    right.set_ylabel("MB on the links")
    right.set_title("Link bytes of that prefill")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="5mbit")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--budgets", nargs="*", default=list(BUDGETS))
    args = parser.parse_args()
    available, reason = testbed_available()
    if not available:
        raise SystemExit(f"no testbed here: {reason}")
    source = open_model("default")
    load_or_fit_basis(source)  # nodes and client share the cached basis
    prompt = source.tokenizer()(module_docs_text(("json", "textwrap", "inspect")), return_tensors="pt").input_ids[:, :512]
    rows = []
    with Testbed(3, rate=args.rate, force=True) as testbed:
        nodes = []
        try:
            for host, span in zip(testbed.hosts(), ("0:10", "10:20", "20:30")):
                peers = nodes[0].initial_peers if nodes else ()
                arguments = ["--blocks", span, "--semantic-basis", "auto"]
                nodes.append(start_node(arguments, peers, prefix=testbed.exec_args(host, []), host=testbed.host_ip(host), timeout=300))
            time.sleep(3)  # the nodes load the cached basis and announce the semantic codec
            for budget in args.budgets:
                rows.append(run_budget(nodes[0].initial_peers, budget, prompt, args.new_tokens))
                row = rows[-1]
                print(
                    f"{budget:>9}: prefill {row['prefill_512_s']:.2f}s, {row['prefill_link_bytes'] / 1e6:.2f} MB, "
                    f"codecs {row['prefill_codecs']} / decode {row['decode_codecs']}, decode {row['decode_tokens_per_s']:.1f} tok/s",
                    flush=True,
                )
        finally:
            for node in nodes:
                node.stop()
    baseline = rows[0]
    for row in rows:
        row["prefill_speedup"] = baseline["prefill_512_s"] / row["prefill_512_s"]
        row["same_tokens_as_lossless"] = sum(a == b for a, b in zip(row["tokens"], baseline["tokens"]))
    print("\n| budget | prefill codecs | decode codecs | 512-token prefill | link MB | speed-up | decode tok/s | tokens as lossless |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['budget']} | {', '.join(row['prefill_codecs'])} | {', '.join(row['decode_codecs'])} | {row['prefill_512_s']:.2f} s "
            f"| {row['prefill_link_bytes'] / 1e6:.2f} | {row['prefill_speedup']:.2f}× | {row['decode_tokens_per_s']:.1f} "
            f"| {row['same_tokens_as_lossless']}/{len(row['tokens'])} |"
        )
    report = {"rate": args.rate, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_links.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / "bench_links.png")
    print(f"wrote {RESULTS / 'bench_links.json'} and bench_links.png")


if __name__ == "__main__":
    main()
