"""Serving throughput under concurrency: N sessions at once through a 3-node loopback swarm.

SmolLM2-135M-Instruct in fp32 on three nodes (blocks 0:10, 10:20, 20:30). For each concurrency N,
N threads share ONE SwarmClient; each opens a session, prefills the same real-text prompt, waits
until every session has prefilled (so the decode phase is measured alone), then greedily decodes
`--new-tokens` tokens with `session.step`, one step per token, recording when each token arrives.

Per N: aggregate decode tokens/s (every decode token / wall time from the start of decoding to the
last token), p50 and p99 per-token latency (gaps between consecutive tokens of a session, over all
sessions), and the CPU the node processes (and their DHT children) used during decoding, in % of one
core. The reference is single-process transformers `generate` with a batch of N identical prompts,
greedy: N * T / (time of generate(T + 1 new tokens) - time of generate(1 new token)), i.e. exactly T
decode forward passes, like the swarm's T decode steps; measured with 1 torch thread and with all,
and the better counts (on a busy machine all threads can be much slower than one).

With `--petals`, `scripts/petals_worker.py` (run by `.petals-venv/bin/python`) serves the same model
directory on 3 Petals servers, and our swarm runs on that directory too, for a side-by-side.
Prints a table and PASS/FAIL lines for the targets, writes bench/results/bench_serving.json and
bench/results/bench_serving.png.

    .venv/bin/python -m scripts.bench_serving                                 # N = 1, 4, 16, 32
    .venv/bin/python -m scripts.bench_serving --concurrency 1 4 --new-tokens 8
    .venv/bin/python -m scripts.bench_serving --petals --petals-model tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from edgeswarm import SwarmClient
from edgeswarm.model.sources import ModelSource, default_model_path, open_model
from devtools.launcher import LocalSwarm
from devtools.reference import load_reference_model

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # for `scripts.bench_generate` and `tests.tiny_models`, however this file is run
    sys.path.insert(0, str(ROOT))

from scripts.bench_generate import even_spans, real_text_prompt

RESULTS = ROOT / "bench" / "results"
SPANS = ["0:10", "10:20", "20:30"]
PETALS_PYTHON = ROOT / ".petals-venv" / "bin" / "python"
PETALS_WORKER = ROOT / "scripts" / "petals_worker.py"
PETALS_CONCURRENCY = (1, 16)

# targets
SCALING_N, SCALING_MIN = 16, 5.0  # N sessions give at least this many times one session's throughput
TAIL_MAX = 3.0  # p99 latency at most this many times p50
VS_SINGLE_PROCESS_MIN = 0.85  # one session at least this fraction of single-process transformers
VS_PETALS_MIN = 1.5  # at least this many times Petals' tokens/s


# --- one concurrency level through the swarm ------------------------------------------------------


@dataclass
class SessionTrace:
    """One session's token arrival times (perf_counter): decode start first, then one per decode token."""

    token_times: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class PhaseResult:
    """What one concurrency level measured."""

    concurrency: int
    sessions_ok: int
    decode_tokens: int
    wall_s: float
    tokens_per_s: float
    per_session_tokens_per_s: float
    p50_ms: float
    p99_ms: float
    node_cpu_percent: float
    client_cpu_percent: float
    errors: list[str]


def process_tree_cpu(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each process in `pids` and of all their descendants."""
    seconds: dict[int, float] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in tree:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            seconds[process.pid] = times.user + times.system
    return seconds


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots (a process born in between counts from zero)."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def run_session(
    client: SwarmClient, prompt: torch.Tensor, new_tokens: int, start_decoding: threading.Barrier, trace: SessionTrace, timeout: float
) -> None:
    """Opens a session, prefills `prompt`, waits for every other session, then decodes `new_tokens` greedy tokens."""
    try:
        with client.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
            token = session.step(prompt).argmax(dim=-1, keepdim=True)
            start_decoding.wait(timeout=timeout)
            trace.token_times.append(time.perf_counter())
            for _ in range(new_tokens):
                token = session.step(token).argmax(dim=-1, keepdim=True)
                trace.token_times.append(time.perf_counter())
    except threading.BrokenBarrierError:
        trace.error = "another session failed before decoding began"
    except Exception as error:  # noqa: BLE001 - recorded in the results; the other sessions go on
        trace.error = f"{type(error).__name__}: {error}"
        start_decoding.abort()  # the others must not wait for this one


def summarize(concurrency: int, traces: list[SessionTrace], decode_began: float, node_cpu: float, client_cpu: float) -> PhaseResult:
    """Throughput, latency percentiles and CPU use from the sessions' token times."""
    finished = [trace for trace in traces if trace.error is None and len(trace.token_times) > 1]
    gaps = np.concatenate([np.diff(trace.token_times) for trace in finished]) if finished else np.array([np.nan])
    decode_tokens = sum(len(trace.token_times) - 1 for trace in finished)
    last_token = max((trace.token_times[-1] for trace in finished), default=decode_began)
    wall = max(last_token - decode_began, 1e-9)
    errors = [trace.error or "no decode token" for trace in traces if all(trace is not done for done in finished)]
    return PhaseResult(
        concurrency=concurrency,
        sessions_ok=len(finished),
        decode_tokens=decode_tokens,
        wall_s=wall,
        tokens_per_s=decode_tokens / wall,
        per_session_tokens_per_s=decode_tokens / wall / max(len(finished), 1),
        p50_ms=float(np.percentile(gaps, 50)) * 1000,
        p99_ms=float(np.percentile(gaps, 99)) * 1000,
        node_cpu_percent=100 * node_cpu / wall,
        client_cpu_percent=100 * client_cpu / wall,
        errors=sorted(set(errors)),
    )


def run_phase(client: SwarmClient, node_pids: list[int], prompt: torch.Tensor, concurrency: int, new_tokens: int, timeout: float) -> PhaseResult:
    """`concurrency` sessions at once through `client`; CPU is counted from the moment all have prefilled."""
    traces = [SessionTrace() for _ in range(concurrency)]
    began: dict[str, object] = {}
    client_process = psutil.Process()

    def on_all_prefilled() -> None:
        began["time"] = time.perf_counter()
        began["nodes"] = process_tree_cpu(node_pids)
        began["client"] = sum(client_process.cpu_times()[:2])

    barrier = threading.Barrier(concurrency, action=on_all_prefilled)
    threads = [
        threading.Thread(target=run_session, args=(client, prompt, new_tokens, barrier, trace, timeout), daemon=True)
        for trace in traces
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    for trace, thread in zip(traces, threads):
        if thread.is_alive() and trace.error is None:
            trace.error = f"timed out after {timeout:.0f}s"  # the thread is left to die when the nodes stop
    if "time" not in began:  # decoding never began: a session failed or timed out before it
        return summarize(concurrency, traces, time.perf_counter(), 0.0, 0.0)
    node_cpu = cpu_used(began["nodes"], process_tree_cpu(node_pids))
    client_cpu = sum(client_process.cpu_times()[:2]) - began["client"]
    return summarize(concurrency, traces, began["time"], node_cpu, client_cpu)


def bench_swarm(
    node_args: list[list[str]], model: str, prompt: torch.Tensor, concurrency: Sequence[int], new_tokens: int, timeout: float
) -> list[PhaseResult]:
    """Starts a loopback swarm, warms it up, runs every concurrency level; the nodes are always stopped."""
    results = []
    with LocalSwarm(node_args) as swarm, SwarmClient(swarm.initial_peers, model=model, mdns=False) as client:
        node_pids = [node.process.pid for node in swarm.nodes]
        warm_up = run_phase(client, node_pids, prompt[:, :16], 1, 2, timeout)
        if warm_up.errors:
            raise RuntimeError(f"the warm-up session failed: {warm_up.errors}")
        for count in concurrency:
            print(f"  {count} session(s) at once ...", flush=True)
            results.append(run_phase(client, node_pids, prompt, count, new_tokens, timeout))
    return results


# --- the single-process reference -----------------------------------------------------------------


def timed_generate(model, batch: torch.Tensor, max_new_tokens: int, pad_token_id: int) -> float:
    """Seconds for one greedy `generate` of exactly `max_new_tokens` tokens per row."""
    began = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids=batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # no early end of sequence: every run does the same work
            do_sample=False,
            pad_token_id=pad_token_id,
        )
    seconds = time.perf_counter() - began
    assert output.shape[1] == batch.shape[1] + max_new_tokens
    return seconds


def identical_batch(prompt: torch.Tensor, size: int) -> torch.Tensor:
    """`size` copies of `prompt`: a left-padded batch of identical prompts needs no padding at all."""
    return prompt.repeat(size, 1)


def reference_speed(model, prompt: torch.Tensor, count: int, new_tokens: int, repeats: int, pad: int) -> float | None:
    """Decode tokens/s of generate with a batch of `count`: T decode passes = generate(T + 1) - generate(1).

    None when the difference is not positive: the machine's noise swamped the decode time.
    """
    batch = identical_batch(prompt, count)
    full = min(timed_generate(model, batch, new_tokens + 1, pad) for _ in range(repeats))
    prefill = min(timed_generate(model, batch, 1, pad) for _ in range(repeats))
    return count * new_tokens / (full - prefill) if full > prefill else None


def bench_reference(
    source: ModelSource, prompt: torch.Tensor, concurrency: Sequence[int], new_tokens: int, repeats: int, threads: Sequence[int]
) -> dict[int, dict[int, float | None]]:
    """Decode tokens/s of single-process transformers generate with batch N, for every N and torch thread count.

    Returns {N: {threads: tokens/s}}. On a busy machine several OpenMP threads can be far slower than one
    (they spin waiting for each other), so the reference is taken as the best thread count: the strongest
    single process this machine runs.
    """
    model = load_reference_model(source)
    tokenizer = source.tokenizer()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(tokenizer.eos_token_id)
    default_threads = torch.get_num_threads()
    speeds: dict[int, dict[int, float | None]] = {count: {} for count in concurrency}
    try:
        for thread_count in threads:
            torch.set_num_threads(thread_count)
            timed_generate(model, prompt, 2, pad)  # warm-up
            for count in concurrency:
                speed = reference_speed(model, prompt, count, new_tokens, repeats, pad)
                speeds[count][thread_count] = speed
                shown = "not measurable (generate(1) took as long as the whole run)" if speed is None else f"{speed:.1f} decode tokens/s"
                print(f"  reference batch {count}, {thread_count} thread(s): {shown}", flush=True)
    finally:
        torch.set_num_threads(default_threads)
    return speeds


def best_speeds(speeds: dict[int, dict[int, float | None]]) -> dict[int, float]:
    """The best measured tokens/s over thread counts, for every batch size that has one."""
    best = {count: max((speed for speed in by_threads.values() if speed is not None), default=None) for count, by_threads in speeds.items()}
    return {count: speed for count, speed in best.items() if speed is not None}


# --- Petals, side by side -------------------------------------------------------------------------


def export_smollm(directory: Path) -> Path:
    """SmolLM2 from the shipped GGUF as a Hugging Face safetensors directory (weights and tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_model_path()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a model read from GGUF as quantized and refuses to save it: copy the (already
    # dequantized) weights into a plain model of the same config
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(directory)
    return directory


def export_tiny(directory: Path) -> Path:
    """A seeded random tiny Llama (the tests' `save_tiny_model`) with 30 blocks, split 10/10/10 like SmolLM2."""
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(directory, "llama", num_layers=30)


def petals_model_dir(kind: str) -> Path:
    """The model directory for the Petals comparison, made once and cached (see model.cache_dir)."""
    from edgeswarm.model.cache_dir import cache_dir

    directory = cache_dir() / "bench-serving" / ("smollm2-135m-hf" if kind == "smollm" else "tiny-llama-30")
    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        print(f"  writing the {kind} model to {directory} ...", flush=True)
        (export_smollm if kind == "smollm" else export_tiny)(directory)
    return directory


def prompt_for(source: ModelSource, length: int) -> torch.Tensor:
    """Real text for a model with a tokenizer, else seeded random token ids."""
    tokenizer = source.tokenizer()
    if tokenizer is not None:
        return real_text_prompt(tokenizer, length)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, source.config.vocab_size, (1, length), generator=generator)


def last_json_line(text: str) -> dict:
    """The last line of `text` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("the worker printed no JSON line")


def petals_missing(python: Path = PETALS_PYTHON, worker: Path = PETALS_WORKER) -> str | None:
    """Why the Petals worker cannot run (a missing file), or None if it can."""
    missing = [str(path) for path in (python, worker) if not path.exists()]
    return f"not run: missing {', '.join(missing)}" if missing else None


def run_petals_worker(
    model_dir: Path, prompt_tokens: int, new_tokens: int, timeout: float, python: Path = PETALS_PYTHON, worker: Path = PETALS_WORKER
) -> dict:
    """Runs the Petals worker and returns its JSON report, or {"error": ...} saying why there is none."""
    missing = petals_missing(python, worker)
    if missing:
        return {"system": "petals", "error": missing}
    command = [
        str(python), str(worker), "--model-dir", str(model_dir), "--servers", "3",
        "--concurrency", *map(str, PETALS_CONCURRENCY), "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens),
    ]  # fmt: skip
    try:
        finished = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"system": "petals", "error": f"the worker did not finish within {timeout:.0f}s", "command": command}
    try:
        report = last_json_line(finished.stdout)
    except ValueError as error:
        tail = "\n".join((finished.stderr or finished.stdout).strip().splitlines()[-15:])
        return {"system": "petals", "error": f"exit code {finished.returncode}, {error}: {tail}", "command": command}
    if finished.returncode != 0:
        report.setdefault("error", f"exit code {finished.returncode}")
    return report


def bench_petals(args: argparse.Namespace) -> dict:
    """Petals and our swarm on the same model directory, at concurrency 1 and 16. Never raises."""
    report: dict = {"model": args.petals_model}
    missing = petals_missing()
    if missing:  # nothing to compare with: do not spend time on our side either
        report["petals"] = {"system": "petals", "error": missing}
        return report
    try:
        model_dir = petals_model_dir(args.petals_model)
        report["model_dir"] = str(model_dir)
        print("Petals worker ...", flush=True)
        report["petals"] = run_petals_worker(model_dir, args.prompt_tokens, args.new_tokens, args.petals_timeout)
        source = open_model(model_dir)
        spans = even_spans(source.num_blocks, 3)
        node_args = [["--model", str(model_dir), "--blocks", span] for span in spans]
        print(f"our swarm on {model_dir} ...", flush=True)
        ours = bench_swarm(node_args, str(model_dir), prompt_for(source, args.prompt_tokens), PETALS_CONCURRENCY, args.new_tokens, args.timeout)
        report["swarm"] = [asdict(result) for result in ours]
    except Exception as error:  # noqa: BLE001 - recorded; the main results stand on their own
        report["error"] = f"{type(error).__name__}: {error}"
    return report


# --- targets, table, files ------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    value: float | None
    threshold: float
    passed: bool | None  # None: not measured in this run

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        value = "not measured" if self.value is None else f"{self.value:.2f}"
        return f"{verdict}  {self.name}: {value} (target {self.threshold:g})"


def at_least(name: str, value: float | None, threshold: float) -> Target:
    return Target(name, value, threshold, None if value is None else value >= threshold)


def check_targets(rows: list[PhaseResult], reference: dict[int, float], petals: dict | None) -> list[Target]:
    """The serving targets, each PASS, FAIL or SKIP (not measured with these options)."""
    by_n = {row.concurrency: row for row in rows if row.sessions_ok == row.concurrency}
    one = by_n.get(1)
    scaling = by_n[SCALING_N].tokens_per_s / one.tokens_per_s if one and SCALING_N in by_n else None
    targets = [at_least(f"{SCALING_N} sessions / 1 session aggregate tokens/s", scaling, SCALING_MIN)]
    for row in rows:
        tail = row.p99_ms / row.p50_ms if row.sessions_ok else None
        targets.append(Target(f"N={row.concurrency} p99 / p50 latency", tail, TAIL_MAX, None if tail is None else tail <= TAIL_MAX))
    single = one.tokens_per_s / reference[1] if one and reference.get(1) else None
    targets.append(at_least("1 session / single-process transformers tokens/s", single, VS_SINGLE_PROCESS_MIN))
    targets.extend(petals_targets(petals))
    return targets


def petals_targets(petals: dict | None) -> list[Target]:
    """Our swarm / Petals tokens/s at each concurrency both measured on the same model directory."""
    if petals is None:
        return []
    theirs = {item["concurrency"]: item.get("tokens_per_s") for item in (petals.get("petals") or {}).get("results", [])}
    ours = {item["concurrency"]: item["tokens_per_s"] for item in petals.get("swarm", []) if not item["errors"]}
    targets = []
    for count in PETALS_CONCURRENCY:
        ratio = ours[count] / theirs[count] if theirs.get(count) and count in ours else None
        targets.append(at_least(f"N={count} swarm / Petals tokens/s", ratio, VS_PETALS_MIN))
    return targets


def print_table(rows: list[PhaseResult], reference: dict[int, float]) -> None:
    print("\n| N | swarm tok/s | per session tok/s | p50 ms | p99 ms | node CPU % | client CPU % | transformers batch-N tok/s | swarm / transformers |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ref = reference.get(row.concurrency)
        ratio = f"{row.tokens_per_s / ref:.2f}x" if ref else "-"
        ref_text = f"{ref:.1f}" if ref else "-"
        print(
            f"| {row.concurrency} | {row.tokens_per_s:.1f} | {row.per_session_tokens_per_s:.1f} | {row.p50_ms:.1f} | {row.p99_ms:.1f} "
            f"| {row.node_cpu_percent:.0f} | {row.client_cpu_percent:.0f} | {ref_text} | {ratio} |"
        )
        if row.errors:
            print(f"  N={row.concurrency}: {row.concurrency - row.sessions_ok} session(s) failed: {row.errors}")


def print_petals(report: dict) -> None:
    """Petals and our swarm, tokens/s side by side on the same model directory, and any errors."""
    print(f"\nPetals comparison on the {report.get('model')} model ({report.get('model_dir', 'not made')})")
    petals = report.get("petals") or {}
    theirs = {item["concurrency"]: item.get("tokens_per_s") for item in petals.get("results", [])}
    ours = {item["concurrency"]: item for item in report.get("swarm", [])}
    print("| N | swarm tok/s | Petals tok/s |")
    print("|---:|---:|---:|")
    for count in PETALS_CONCURRENCY:
        mine = ours.get(count)
        mine_text = "-" if mine is None or mine["errors"] else f"{mine['tokens_per_s']:.1f}"
        their_text = "-" if theirs.get(count) is None else f"{theirs[count]:.1f}"
        print(f"| {count} | {mine_text} | {their_text} |")
    for source, errors in (("Petals", [petals.get("error"), *petals.get("errors", [])]), ("comparison", [report.get("error")])):
        for error in filter(None, errors):
            print(f"  {source}: {error}")


def plot(rows: list[PhaseResult], reference: dict[int, float], new_tokens: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [row.concurrency for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(counts, [row.tokens_per_s for row in rows], "o-", label="3-node swarm")
    left.plot(counts, [reference.get(count, np.nan) for count in counts], "s--", label="transformers, batch N")
    left.set_ylabel("aggregate decode tokens/s")
    left.set_title(f"Throughput ({new_tokens} new tokens per session)")
    right.plot(counts, [row.p50_ms for row in rows], "o-", label="p50")
    right.plot(counts, [row.p99_ms for row in rows], "^-", label="p99")
    right.set_ylabel("per-token latency, ms")
    right.set_title("Swarm per-token latency")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(count) for count in counts])
        axis.set_xlabel("concurrent sessions N")
        axis.legend()
    figure.suptitle("SmolLM2-135M fp32, 3 nodes on loopback, 2 CPU cores")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32], help="numbers of sessions at once")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per session")
    parser.add_argument("--reference-repeats", type=int, default=1, help="best of this many reference generates")
    parser.add_argument("--reference-threads", type=int, nargs="+", default=None, help="torch thread counts to try for the reference; the best counts (default: 1 and all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one concurrency level may take")
    parser.add_argument("--petals", action="store_true", help="also compare with Petals (scripts/petals_worker.py)")
    parser.add_argument("--petals-model", choices=["smollm", "tiny"], default="smollm", help="the model directory both run")
    parser.add_argument("--petals-timeout", type=float, default=1800.0, help="seconds the Petals worker may take")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    source = open_model("default")
    prompt = real_text_prompt(source.tokenizer(), args.prompt_tokens)

    print("single-process transformers reference ...", flush=True)
    threads = args.reference_threads or sorted({1, torch.get_num_threads()})
    reference_runs = bench_reference(source, prompt, sorted(set(args.concurrency) | {1}), args.new_tokens, args.reference_repeats, threads)
    reference = best_speeds(reference_runs)
    print("3-node swarm ...", flush=True)
    rows = bench_swarm([["--blocks", span] for span in SPANS], "default", prompt, args.concurrency, args.new_tokens, args.timeout)
    petals = bench_petals(args) if args.petals else None

    print(f"\nSmolLM2-135M-Instruct fp32, 3 nodes {' '.join(SPANS)}, {args.prompt_tokens}-token prompt, {args.new_tokens} decode tokens per session")
    print_table(rows, reference)
    if petals is not None:
        print_petals(petals)
    targets = check_targets(rows, reference, petals)
    print()
    for target in targets:
        print(target.line())

    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "model": source.model_id,
        "spans": SPANS,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "machine": {"cpus": psutil.cpu_count(), "load_average": list(psutil.getloadavg()), "platform": platform.platform(), "torch": torch.__version__},
        "rows": [asdict(row) for row in rows],
        "reference_tokens_per_s": {str(count): speed for count, speed in reference.items()},
        "reference_tokens_per_s_by_threads": {str(count): {str(t): v for t, v in runs.items()} for count, runs in reference_runs.items()},
        "reference_repeats": args.reference_repeats,
        "petals": petals,
        "targets": [asdict(target) for target in targets],
    }
    (RESULTS / "bench_serving.json").write_text(json.dumps(report, indent=2))
    plot(rows, reference, args.new_tokens, RESULTS / "bench_serving.png")
    print(f"wrote {RESULTS / 'bench_serving.json'} and bench_serving.png")


if __name__ == "__main__":
    main()
