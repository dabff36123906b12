"""What spot checks cost: decode speed of one session at several spot-check rates, on a 3-node swarm.

SmolLM2-135M-Instruct in fp32 on loopback. Every node serves all 30 blocks, so a session runs on one of
them and the other two can verify it (swarm.spot_check). The same session (a 128-token prompt of real
text, 64 new tokens, greedy) runs at each rate in turn, `--repeats` times over, with the same seed for
every rate, so a higher rate checks a superset of the steps a lower one checks. The prefill step is
checked at every rate above 0 and is not part of the decode speed. A check recomputes the whole sequence
so far, so it costs more in longer sessions: `--prompt-tokens 512` shows how much.
Run from the repository root: `python -m scripts.bench_spot_check`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from edgeswarm import SwarmClient
from edgeswarm.model.sources import open_model
from devtools.launcher import LocalSwarm
from edgeswarm.swarm.policy import SessionPolicy
from scripts.bench_generate import real_text_prompt, time_loop

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
NODES = 3
RATES = (0.0, 0.02, 0.05, 0.1, 0.2)
DEFAULT_PROMPT_TOKENS = 128


def bench_rate(client: SwarmClient, prompt: torch.Tensor, new_tokens: int, rate: float, seed: int) -> dict:
    """One session at spot-check rate `rate`: its decode tokens/s and how many of its steps were checked."""
    policy = SessionPolicy(spot_check=rate, spot_check_seed=seed)
    with client.inference_session(max_length=prompt.shape[1] + new_tokens, policy=policy) as session:
        prefill_seconds, tokens_per_second = time_loop(session.step, prompt, new_tokens)
        stats = session.spot_checks
        return {"decode_tokens_per_s": tokens_per_second, "prefill_s": prefill_seconds, "checks": stats.checks, "agreed": stats.agreed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES), help="spot-check rates to run (0 first: the baseline)")
    args = parser.parse_args()

    source = open_model("default")
    prompt = real_text_prompt(source.tokenizer(), args.prompt_tokens)
    runs: dict[float, list[dict]] = {rate: [] for rate in args.rates}
    with LocalSwarm([["--blocks", f"0:{source.num_blocks}"]] * NODES) as swarm, SwarmClient(swarm.initial_peers) as client:
        bench_rate(client, prompt, 4, 0.0, 0)  # warm-up
        for repeat in range(args.repeats):  # rates interleaved, so that load changes hit them all alike
            for rate in args.rates:
                runs[rate].append(bench_rate(client, prompt, args.new_tokens, rate, seed=repeat))

    rows = []
    for rate in args.rates:
        speed = statistics.median(run["decode_tokens_per_s"] for run in runs[rate])
        rows.append({"spot_check": rate, "decode_tokens_per_s": speed, "checks": statistics.median(run["checks"] for run in runs[rate]), "runs": runs[rate]})
    baseline = rows[0]["decode_tokens_per_s"]
    print(f"\nSmolLM2-135M-Instruct fp32, {NODES} nodes serving all blocks, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'spot_check':>10} {'decode tok/s':>12} {'vs off':>7} {'checked steps':>14}")
    for row in rows:
        row["vs_off"] = row["decode_tokens_per_s"] / baseline
        print(f"{row['spot_check']:>10.2f} {row['decode_tokens_per_s']:>12.2f} {row['vs_off']:>6.2f}x {row['checks']:>14.0f}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "model": source.model_id,
        "nodes": NODES,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }
    name = "bench_spot_check.json" if args.prompt_tokens == DEFAULT_PROMPT_TOKENS else f"bench_spot_check_{args.prompt_tokens}.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
