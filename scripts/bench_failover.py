"""Failover and rebalancing on loopback with SmolLM2-135M-Instruct.

1. kill / stall: a 4-node swarm (0:10, 10:20 twice, 20:30); a session runs through the second 10:20
   node, which is killed (SIGKILL of its whole process group) or frozen (SIGSTOP) after 16 tokens. We
   time the step that meets the failure (from the failure to the next token) and compare all 48 greedy
   tokens with a single-process run.
2. rebalance: three pinned nodes plus one that chose its own blocks; the pinned node of another span
   crashes, and we time how long until the swarm covers every block again (and the mover's join time).
Prints tables, writes bench/results/bench_failover.json and bench/results/bench_failover.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from pathlib import Path

from edgeswarm import SwarmClient
from edgeswarm.model.sources import open_model
from devtools.launcher import LocalSwarm, start_node
from devtools.reference import load_reference_model, reference_greedy_tokens
from edgeswarm.partition.coverage import coverage_gaps
from edgeswarm.swarm.routing import Hop
from devtools.decoding import greedy_decode

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
PROMPT_MESSAGES = [{"role": "user", "content": "Name three rivers of Europe and say where each one flows."}]


def failure_trial(swarm: LocalSwarm, client: SwarmClient, prompt: list[int], expected: list[int], how: str, fail_after: int) -> dict:
    victim = start_node(["--blocks", "10:20"], swarm.initial_peers)
    records = {record.address: record for record in client.servers()}
    route = [Hop(records[swarm.nodes[0].address], 0, 10), Hop(records[victim.address], 10, 20), Hop(records[swarm.nodes[2].address], 20, 30)]
    step_times: list[float] = []
    last = [time.perf_counter()]

    def after_token(index: int) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        if index == fail_after:
            if how == "kill":
                os.killpg(victim.process.pid, signal.SIGKILL)
            else:
                victim.process.send_signal(signal.SIGSTOP)
        last[0] = time.perf_counter()

    try:
        with client.inference_session(max_length=256, route=route) as session:
            tokens = greedy_decode(session, prompt, len(expected), after_token=after_token)
            events = session.failovers
    finally:
        if how == "stall":
            victim.process.send_signal(signal.SIGCONT)
        victim.stop(signal.SIGKILL)
    normal = statistics.median(step_times[1 : fail_after + 1])
    return {
        "how": how,
        "failure_to_next_token_s": step_times[fail_after + 1],
        "normal_step_s": normal,
        "failover_s": events[0].seconds if events else None,
        "replayed_tokens": events[0].replayed_tokens if events else 0,
        "failovers": len(events),
        "tokens_differing_from_reference": sum(a != b for a, b in zip(tokens, expected)) + abs(len(tokens) - len(expected)),
    }


def rebalance_trial() -> dict:
    pinned = [["--blocks", span, "--announce-ttl", "6"] for span in ("0:10", "10:20", "20:30")]
    with LocalSwarm(pinned) as swarm, SwarmClient(swarm.initial_peers) as client:
        began = time.perf_counter()
        mover = swarm.add_node(["--num-blocks", "10", "--rebalance-period", "5"])
        join_to_serving = time.perf_counter() - began
        victim = next(node for node in swarm.nodes[:3] if node.blocks != mover.blocks)
        os.killpg(victim.process.pid, signal.SIGKILL)
        crashed = time.perf_counter()
        gap_seen = None
        while time.perf_counter() - crashed < 120:
            records = client.servers()
            gaps = coverage_gaps(records, client.model.num_blocks)
            if gaps and gap_seen is None:
                gap_seen = time.perf_counter() - crashed
            if not gaps and any(r.address == mover.address and (r.start_block, r.end_block) == victim.blocks for r in records):
                break
            time.sleep(0.25)
        covered_again = time.perf_counter() - crashed
        generation_ok = bool(client.generate("Hello", max_new_tokens=4).token_ids)
    return {
        "join_to_serving_s": join_to_serving,
        "crash_to_expiry_s": gap_seen,
        "crash_to_full_coverage_s": covered_again,
        "moved": f"{mover.blocks[0]}:{mover.blocks[1]} -> {victim.blocks[0]}:{victim.blocks[1]}",
        "generation_after_rebalance": generation_ok,
    }


def plot(trials: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    labels = [f"{trial['how']} #{i + 1}" for i, trial in enumerate(trials)]
    axis.bar(labels, [trial["failure_to_next_token_s"] for trial in trials], color=["tab:red" if t["how"] == "kill" else "tab:purple" for t in trials], label="failure to next token")
    axis.bar(labels, [trial["normal_step_s"] for trial in trials], color="tab:gray", label="normal decode step")
    axis.axhline(2.0, color="black", linestyle="--", linewidth=1, label="target 2 s")
    axis.set_ylabel("seconds")
    axis.set_title("SmolLM2-135M, 3-hop route on loopback: a node dies or stalls after 16 tokens")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--fail-after", type=int, default=16)
    args = parser.parse_args()

    source = open_model("default")
    tokenizer = source.tokenizer()
    prompt = tokenizer(tokenizer.apply_chat_template(PROMPT_MESSAGES, tokenize=False, add_generation_prompt=True)).input_ids
    expected = reference_greedy_tokens(load_reference_model(source), prompt, args.tokens)

    trials = []
    with LocalSwarm([["--blocks", span] for span in ("0:10", "10:20", "20:30")]) as swarm, SwarmClient(swarm.initial_peers) as client:
        for how in ("kill", "stall"):
            for _ in range(args.trials):
                trials.append(failure_trial(swarm, client, prompt, expected, how, args.fail_after))
    rebalance = rebalance_trial()

    print(f"\n{'failure':<8} {'failure->next token':>20} {'normal step':>12} {'replayed':>9} {'altered tokens':>15}")
    for trial in trials:
        print(f"{trial['how']:<8} {trial['failure_to_next_token_s']:>19.3f}s {trial['normal_step_s']:>11.3f}s {trial['replayed_tokens']:>9} {trial['tokens_differing_from_reference']:>15}")
    print(f"\nrebalance: join-to-serving {rebalance['join_to_serving_s']:.1f}s, crash->record expired {rebalance['crash_to_expiry_s']:.1f}s, "
          f"crash->full coverage {rebalance['crash_to_full_coverage_s']:.1f}s (moved {rebalance['moved']})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_failover.json").write_text(json.dumps({"model": source.model_id, "tokens": args.tokens, "fail_after": args.fail_after, "trials": trials, "rebalance": rebalance}, indent=2))
    plot(trials, RESULTS / "bench_failover.png")
    print(f"wrote {RESULTS / 'bench_failover.json'} and bench_failover.png")


if __name__ == "__main__":
    main()
