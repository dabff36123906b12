"""Generation over edge links with latency: the client relay, hop-to-hop forwarding, and forwarding with
prompt-lookup speculative decoding.

3 testbed hosts (scripts/testbed.sh) serve SmolLM2-135M-Instruct, 10 blocks each, behind delay relays
(devtools/delay_relay.py), every link capped at `--rate`; the client runs in a 4th host. At each one-way
delay (every host delays what it sends by it, so a round trip between two hosts gains twice the delay),
one session prefills a 512-token prompt that asks to repeat a text it holds (a summary or a code edit
repeats its input the same way) and decodes `--new-tokens` greedy tokens in each mode (MODES), taking
turns, `--repeats` times. Reported: time to first token (prefill plus the first token) and decode
tokens/s, medians, and the speed-ups; the tokens must be the same in every mode.

Writes bench/results/bench_wan.json and bench/results/bench_wan.png. Needs root.
Run from the repository root: `python -m scripts.bench_wan`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from devtools.testbed import Testbed, testbed_available

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
HOSTS = 3  # serving hosts; the client runs in one more
BLOCKS_PER_HOST = 10
PROMPT_TOKENS = 512
DELAYS_MS = (0, 10, 25)
MODES = {  # name: (SessionPolicy.forwarding, speculate)
    "relay": (False, False),
    "forwarding": (True, False),
    "forwarding + speculation": (True, True),
}
CLIENT_TIMEOUT_S = 1800.0

# What the client in the testbed runs: it prints one JSON line per measured generation.
CLIENT = r"""
import json, sys, time
from dataclasses import replace
from edgeswarm import SwarmClient
from devtools.waiting import poll

peers, new_tokens, prompt_tokens, repeats = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
modes = json.loads(sys.argv[6])
with SwarmClient(peers, mdns=False) as client:
    poll(lambda: len(client.servers()) >= 3, 120)
    text = open(sys.argv[5]).read()
    ids = client.tokenizer(text).input_ids[: prompt_tokens - 24]
    request = client.tokenizer.decode(ids)
    chat = [{"role": "user", "content": "Repeat the following text exactly.\n\n" + request}]
    prompt = client.tokenizer(client.apply_chat_template(chat)).input_ids
    client.generate(prompt[:64], max_new_tokens=2)  # measures every link once
    for repeat in range(repeats):
        for mode, (forwarding, speculate) in modes.items():
            client.policy = replace(client.policy, forwarding=forwarding)
            began = time.monotonic()
            first = None
            tokens = []
            for event in client.stream(prompt, max_new_tokens=new_tokens, speculate=speculate):
                first = first or time.monotonic()
                tokens.append(event.token_id)
            ended = time.monotonic()
            print(json.dumps({"mode": mode, "ttft_s": first - began, "decode_tokens_per_s": (len(tokens) - 1) / (ended - first),
                              "tokens": tokens, "prompt_tokens": len(prompt)}), flush=True)
"""


def run_delay(delay_ms: int, rate: str, new_tokens: int, repeats: int, text_file: Path) -> list[dict]:
    """The client's measurements with every host delaying what it sends by `delay_ms`."""
    with Testbed(HOSTS + 1, rate=rate, delay=f"{delay_ms}ms" if delay_ms else None) as testbed:
        first = testbed.start_node(1, ["--blocks", f"0:{BLOCKS_PER_HOST}", "--no-mdns"])
        nodes = [first] + [
            testbed.start_node(host, ["--blocks", f"{(host - 1) * BLOCKS_PER_HOST}:{host * BLOCKS_PER_HOST}", "--no-mdns"], first.initial_peers)
            for host in range(2, HOSTS + 1)
        ]
        try:
            argv = [sys.executable, "-c", CLIENT, json.dumps(first.initial_peers), str(new_tokens), str(PROMPT_TOKENS), str(repeats), str(text_file), json.dumps(MODES)]
            finished = testbed.run(HOSTS + 1, argv, timeout=CLIENT_TIMEOUT_S, cwd=str(Path(__file__).resolve().parent.parent))
            if finished.returncode != 0:
                raise RuntimeError(f"the client failed:\n{finished.stderr[-3000:]}")
            return [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
        finally:
            for node in nodes:
                node.stop()


def summarize(delay_ms: int, runs: list[dict]) -> dict:
    """Medians per mode at one delay, the speed-ups, and whether every run gave the same tokens."""
    row = {"delay_ms": delay_ms, "same_tokens": all(run["tokens"] == runs[0]["tokens"] for run in runs)}
    for mode in MODES:
        mine = [run for run in runs if run["mode"] == mode]
        row[mode] = {key: statistics.median(run[key] for run in mine) for key in ("decode_tokens_per_s", "ttft_s")}
    speed = {mode: row[mode]["decode_tokens_per_s"] for mode in MODES}
    row["forwarding_speed_up"] = speed["forwarding"] / speed["relay"]
    row["speculation_speed_up"] = speed["forwarding + speculation"] / speed["forwarding"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=int, nargs="+", default=list(DELAYS_MS), help="one-way delays in ms")
    parser.add_argument("--rate", default="20mbit")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    available, reason = testbed_available()
    if not available:
        sys.exit(f"bench_wan needs the testbed: {reason}")
    text_file = Path(__file__).resolve().parent.parent / "README.md"  # a long real text to repeat
    rows = [summarize(delay, run_delay(delay, args.rate, args.new_tokens, args.repeats, text_file)) for delay in args.delays]

    header = " | ".join(f"{mode} tok/s | {mode} TTFT" for mode in MODES)
    print(f"\n| one-way delay | {header} | forwarding / relay | speculation on top | same tokens |")
    print("|---" * (2 * len(MODES) + 4) + "|")
    for row in rows:
        cells = " | ".join(f"{row[mode]['decode_tokens_per_s']:.2f} | {row[mode]['ttft_s']:.2f} s" for mode in MODES)
        print(f"| {row['delay_ms']} ms | {cells} | {row['forwarding_speed_up']:.2f}x | {row['speculation_speed_up']:.2f}x | {row['same_tokens']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_wan.json").write_text(json.dumps({"rate": args.rate, "new_tokens": args.new_tokens, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    delays = [row["delay_ms"] for row in rows]
    for mode, marker in zip(MODES, "os^"):
        axis.plot(delays, [row[mode]["decode_tokens_per_s"] for row in rows], f"{marker}-", label=mode)
    axis.set_xlabel("one-way delay per host (ms)")
    axis.set_ylabel("decode tokens/s")
    axis.set_title(f"SmolLM2-135M, 3 hosts x 10 blocks, {args.rate} links")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "bench_wan.png", dpi=120)
    print(f"wrote {RESULTS / 'bench_wan.json'} and {RESULTS / 'bench_wan.png'}")


if __name__ == "__main__":
    main()
