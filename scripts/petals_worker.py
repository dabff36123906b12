"""Petals 2.x side of scripts/bench_serving.py: a private 3-server Petals swarm on loopback, decode speed.

Run with the separate venv made by scripts/petals_env.sh (never with the project's .venv):

    bash scripts/petals_env.sh
    .petals-venv/bin/python scripts/petals_worker.py --make-tiny /tmp/petals-tiny          # tiny random Llama
    .petals-venv/bin/python scripts/petals_worker.py --model-dir /tmp/smollm2-hf \\
        --servers 3 --concurrency 1 16 --prompt-tokens 128 --new-tokens 32

It starts `--servers` Petals servers (`petals.cli.run_server`, blocks split evenly with --block_indices, the
first one with --new_swarm, the others with --initial_peers), all on /ip4/127.0.0.1, float32 on the CPU, no
quantization, throughput fixed (no start-up benchmark). A Petals client in this process waits until every
block is ONLINE, then for each concurrency N runs N sessions in parallel threads. Each session opens
`model.inference_session(max_length=prompt+new)`, calls `model.generate(prompt, max_new_tokens=1)` (prefill,
timed per session), waits at a barrier for the other sessions, then `model.generate(None,
max_new_tokens=new_tokens - 1)` in the same session (greedy, eos disabled). Like scripts/bench_generate.py:
prefill = the step that yields the first token; decode tokens/s = tokens generated after that, summed over
sessions, / wall time from the barrier to the last session's end. The last line on stdout is one JSON object:

    {"system": "petals", "version": "2.2.0.post1", "versions": {...}, "model_dir": ..., "servers": 3,
     "results": [{"concurrency": N, "tokens_per_s": ..., "prefill_s": <median over sessions>,
                  "new_tokens": ..., ...}], "errors": [...]}

All servers run in their own process groups and are killed on exit, on error, on SIGTERM/SIGINT and when
the global --timeout runs out (a watchdog prints the JSON with what it has and exits).

Runtime shims (applied in this process and, via `--_server`, in each server process; nothing in
site-packages is edited):
  1. hivemind 1.1.10.post2 imports `torch.cuda.amp.grad_scaler._refresh_per_optimizer_state`, which torch
     2.13 only has in `torch.amp.grad_scaler`: alias it before hivemind is imported.
  2. `petals.cli.run_server` calls `validate_version()`, an HTTP request to PyPI at every start: made a no-op.
  3. HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set: everything is read from --model-dir.

SmolLM2-135M-Instruct as a Hugging Face directory. It must be exported by the PROJECT's venv (transformers 5,
which reads the GGUF that ships with the project); this venv (transformers 4.34) cannot. The snippet is
SMOLLM_EXPORT_SNIPPET below; `--print-smollm-export` prints it (stdlib only, any python), e.g.:

    .petals-venv/bin/python scripts/petals_worker.py --print-smollm-export > /tmp/export_smollm.py
    (cd /work/main && .venv/bin/python /tmp/export_smollm.py /tmp/smollm2-hf)

The GGUF is Q4_1; transformers de-quantizes it to float32, so both systems run the same (de-quantized)
weights. save_pretrained refuses a GGUF-loaded model, so the snippet writes the state dict with safetensors,
and rewrites config.json for transformers 4.34 (rope_theta from rope_parameters, torch_dtype, no
quantization_config).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SMOLLM_EXPORT_SNIPPET = r'''
# Run with the project's venv from /work/main: .venv/bin/python THIS_FILE OUT_DIR
import json, os, sys
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from edgeswarm.model.sources import default_model_path

out = sys.argv[1]
gguf = default_model_path()
folder, name = os.path.dirname(gguf), os.path.basename(gguf)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
os.makedirs(out, exist_ok=True)
state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
if getattr(model.config, "tie_word_embeddings", False):
    state.pop("lm_head.weight", None)
save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
model.config.save_pretrained(out)
tokenizer.save_pretrained(out)
path = os.path.join(out, "config.json")
cfg = json.load(open(path))
cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
cfg.setdefault("torch_dtype", "float32")
cfg.pop("quantization_config", None)
cfg.pop("_model_name_or_path", None)
json.dump(cfg, open(path, "w"), indent=2)
print(out)
'''

DHT_PREFIX = "edgeswarm-bench"
MADDR_RE = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/[1-9A-HJ-NP-Za-km-z]+")


# ----------------------------------------------------------------------------------------------- shims
def apply_shims() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch.amp.grad_scaler as amp_scaler
    import torch.cuda.amp.grad_scaler as cuda_scaler

    for name in ("_refresh_per_optimizer_state", "OptState"):
        if not hasattr(cuda_scaler, name) and hasattr(amp_scaler, name):
            setattr(cuda_scaler, name, getattr(amp_scaler, name))
    import petals.utils.version

    petals.utils.version.validate_version = lambda: None


def run_server_mode(argv: list[str]) -> None:
    """`petals_worker.py --_server --threads T <run_server args>`: one Petals server with the shims."""
    threads = 1
    if argv[:1] == ["--threads"]:
        threads, argv = int(argv[1]), argv[2:]
    apply_shims()
    import torch

    torch.set_num_threads(threads)
    import petals.cli.run_server as run_server

    run_server.validate_version = lambda: None
    sys.argv = ["petals.cli.run_server"] + argv
    run_server.main()


# ----------------------------------------------------------------------------------------------- tiny model
def make_tiny(out_dir: str, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(out_dir, "model.safetensors")):
        return
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=2048,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)


# ----------------------------------------------------------------------------------------------- processes
class Swarm:
    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []
        self._lock = threading.Lock()

    def start(self, args: list[str], threads: int) -> int:
        index = len(self.procs)
        log_path = os.path.join(self.log_dir, f"server{index}.log")
        cmd = [sys.executable, os.path.abspath(__file__), "--_server", "--threads", str(threads)] + args
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        with open(log_path, "wb") as log, self._lock:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env)
            self.procs.append(proc)
            self.logs.append(log_path)
        return index

    def log_text(self, index: int) -> str:
        try:
            with open(self.logs[index], "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tail(self, index: int, lines: int = 15) -> str:
        return "\n".join(self.log_text(index).splitlines()[-lines:])

    def wait_for_maddr(self, index: int, deadline: float) -> str:
        while time.monotonic() < deadline:
            match = MADDR_RE.search(self.log_text(index))
            if match:
                return match.group(0)
            if self.procs[index].poll() is not None:
                raise RuntimeError(f"server {index} exited with {self.procs[index].returncode}:\n{self.tail(index)}")
            time.sleep(0.2)
        raise TimeoutError(f"server {index} printed no multiaddr in time:\n{self.tail(index)}")

    def check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                raise RuntimeError(f"server {i} exited with {proc.returncode}:\n{self.tail(i)}")

    def stop(self) -> None:
        with self._lock:
            procs = list(self.procs)
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs:  # the group may outlive its leader (handlers, p2pd): kill it whatever happened
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def kill_own_descendants() -> None:
    """Kill the processes this process started itself (the client's p2pd daemon), by pid."""
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    stack, found = list(children.get(me, [])), []
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ----------------------------------------------------------------------------------------------- benchmark
def versions() -> dict:
    out = {}
    for name in ("petals", "hivemind", "torch", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001
            out[name] = f"unavailable: {exc}"
    return out


def wait_all_blocks(model, num_blocks: int, swarm: Swarm, deadline: float) -> None:
    manager = model.transformer.h.sequence_manager
    with manager._thread_start_lock:  # Petals starts its DHT-refresh thread lazily, on the first request
        if not manager.is_alive():
            manager._thread.start()
    while True:
        swarm.check_alive()
        manager.update(wait=False)
        manager.ready.wait(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
        spans = manager.state.sequence_info.spans_containing_block
        missing = [i for i in range(num_blocks) if not spans[i]]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"blocks still missing from the swarm: {missing}")
        time.sleep(1.0)


def run_concurrency(model, torch, n: int, prompt_ids: list[int], new_tokens: int, deadline: float) -> dict:
    prompt = torch.tensor([prompt_ids], dtype=torch.long)
    max_length = len(prompt_ids) + new_tokens + 1
    barrier = threading.Barrier(n + 1)
    prefill = [None] * n
    generated = [0] * n
    errors: list[str] = []
    decode_end = [None] * n
    tokens = [None] * n
    gen_kwargs = dict(do_sample=False)  # eos/pad ids are cleared on model.generation_config (see main)

    def session_main(i: int) -> None:
        try:
            with torch.inference_mode(), model.inference_session(max_length=max_length) as session:
                t0 = time.perf_counter()
                first = model.generate(prompt, max_new_tokens=1, session=session, **gen_kwargs)
                prefill[i] = time.perf_counter() - t0
                assert first.shape[1] == len(prompt_ids) + 1, first.shape
                barrier.wait(timeout=max(1.0, deadline - time.monotonic()))
                if new_tokens > 1:
                    rest = model.generate(None, max_new_tokens=new_tokens - 1, min_new_tokens=new_tokens - 1,
                                          session=session, **gen_kwargs)
                    generated[i] = int(rest.shape[1])
                    tokens[i] = first[0, len(prompt_ids):].tolist() + rest[0].tolist()
                else:
                    tokens[i] = first[0, len(prompt_ids):].tolist()
                decode_end[i] = time.perf_counter()
        except threading.BrokenBarrierError:
            errors.append(f"session {i}: barrier broken (another session failed or timed out)")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"session {i}: {type(exc).__name__}: {exc}")
            barrier.abort()

    threads = [threading.Thread(target=session_main, args=(i,), daemon=True, name=f"session{i}") for i in range(n)]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=max(1.0, deadline - time.monotonic()))
        decode_start = time.perf_counter()
    except threading.BrokenBarrierError:
        decode_start = None
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        errors.append(f"concurrency {n}: sessions still running at the deadline")
    row = {"concurrency": n, "new_tokens": new_tokens, "prompt_tokens": len(prompt_ids)}
    ok_prefill = [p for p in prefill if p is not None]
    if ok_prefill:
        row["prefill_s"] = statistics.median(ok_prefill)
        row["prefill_s_max"] = max(ok_prefill)
    ends = [e for e in decode_end if e is not None]
    if decode_start is not None and len(ends) == n and not errors:
        wall = max(ends) - decode_start
        total = sum(generated)
        row.update(decode_s=wall, decode_tokens=total, tokens_per_s=total / wall if wall > 0 else None)
    else:
        row["tokens_per_s"] = None
    row["errors"] = errors
    row["_tokens"] = tokens[0]
    return row


def main() -> None:
    if sys.argv[1:2] == ["--_server"]:
        run_server_mode(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", help="Hugging Face Llama directory (config.json + safetensors)")
    parser.add_argument("--make-tiny", metavar="DIR", help="create a tiny random Llama in DIR (if missing) and use it")
    parser.add_argument("--tiny-layers", type=int, default=30)
    parser.add_argument("--make-only", action="store_true", help="with --make-tiny: create the model and exit")
    parser.add_argument("--print-smollm-export", action="store_true", help="print the SmolLM2 export snippet")
    parser.add_argument("--versions", action="store_true", help="import petals (with the shims), print versions")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each server process")
    parser.add_argument("--client-threads", type=int, default=1, help="torch threads in the client process")
    parser.add_argument("--num-handlers", type=int, default=8, help="Petals --num_handlers per server (its default: 8)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up sessions (1 session, 4+2 tokens) before timing")
    parser.add_argument("--timeout", type=float, default=540.0, help="global time limit in seconds")
    parser.add_argument("--start-timeout", type=float, default=240.0, help="limit for swarm start-up")
    parser.add_argument("--verify", action="store_true",
                        help="after timing, compare session 0's greedy tokens with plain transformers on the same dir")
    parser.add_argument("--log-dir", help="keep server logs here (default: a temp dir, removed)")
    args = parser.parse_args()

    if args.print_smollm_export:
        print(SMOLLM_EXPORT_SNIPPET.lstrip())
        return
    if args.versions:
        apply_shims()
        import petals.cli.run_server  # noqa: F401
        from petals import AutoDistributedModelForCausalLM  # noqa: F401

        print(json.dumps(versions()))
        return

    began = time.monotonic()
    deadline = began + args.timeout
    report: dict = {"system": "petals", "version": None, "results": [], "errors": []}
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="petals-bench-")
    os.makedirs(log_dir, exist_ok=True)
    swarm = Swarm(log_dir)
    finished = threading.Event()
    emit_lock = threading.Lock()

    main_pid = os.getpid()

    def emit_and_exit(code: int) -> None:
        if os.getpid() != main_pid:  # a process hivemind forked from this one (its DHT, ...): just leave
            os._exit(code)
        with emit_lock:
            if finished.is_set():
                return
            finished.set()
            swarm.stop()
            kill_own_descendants()
            if not args.log_dir:
                import shutil

                shutil.rmtree(log_dir, ignore_errors=True)
            report["elapsed_s"] = round(time.monotonic() - began, 1)
            sys.stdout.flush()
            sys.stderr.flush()
            os.write(1, (json.dumps(report) + "\n").encode())
            os._exit(code)

    def watchdog() -> None:
        remaining = deadline - time.monotonic() + 15  # grace for the main thread's own per-wait deadlines
        if not finished.wait(timeout=max(0.0, remaining)):
            report["errors"].append(f"global timeout of {args.timeout:.0f}s reached")
            import faulthandler

            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)  # where the client hung
            for i in range(len(swarm.procs)):
                report["errors"].append(f"server {i} log tail:\n{swarm.tail(i)}")
            emit_and_exit(3)

    threading.Thread(target=watchdog, daemon=True, name="watchdog").start()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: (report["errors"].append(f"got signal {signum}"), emit_and_exit(4)))

    try:
        apply_shims()
        import torch

        torch.set_num_threads(args.client_threads)
        report["versions"] = versions()
        report["version"] = report["versions"]["petals"]
        if args.make_tiny:
            make_tiny(args.make_tiny, args.tiny_layers)
            if args.make_only:
                emit_and_exit(0)
            args.model_dir = args.model_dir or args.make_tiny
        if not args.model_dir:
            raise SystemExit("--model-dir or --make-tiny is required")
        model_dir = os.path.abspath(args.model_dir)
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        num_blocks = int(config["num_hidden_layers"])
        vocab = int(config["vocab_size"])
        report.update(model_dir=model_dir, servers=args.servers, num_blocks=num_blocks,
                      server_threads=args.threads, num_handlers=args.num_handlers)

        # ---- swarm
        bounds = [round(i * num_blocks / args.servers) for i in range(args.servers + 1)]
        common = [model_dir, "--dht_prefix", DHT_PREFIX, "--host_maddrs", "/ip4/127.0.0.1/tcp/0",
                  "--torch_dtype", "float32", "--device", "cpu", "--quant_type", "none", "--throughput", "1.0",
                  "--num_handlers", str(args.num_handlers),
                  "--inference_max_length", str(max(2048, args.prompt_tokens + args.new_tokens + 8)),
                  "--skip_reachability_check", "--no_auto_relay", "--update_period", "30"]
        start_deadline = min(deadline, time.monotonic() + args.start_timeout)
        swarm.start(common + ["--block_indices", f"{bounds[0]}:{bounds[1]}", "--new_swarm"], args.threads)
        first_maddr = swarm.wait_for_maddr(0, start_deadline)
        report["initial_peer"] = first_maddr
        for s in range(1, args.servers):
            swarm.start(common + ["--block_indices", f"{bounds[s]}:{bounds[s + 1]}", "--initial_peers", first_maddr],
                        args.threads)
        report["block_indices"] = [f"{bounds[s]}:{bounds[s + 1]}" for s in range(args.servers)]

        from petals import AutoDistributedModelForCausalLM

        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=[first_maddr], dht_prefix=DHT_PREFIX, torch_dtype=torch.float32,
            max_retries=2, show_route=False, request_timeout=120,
        )
        model.eval()
        # No eos (every session makes exactly new_tokens) and no pad id (else HF derives an attention mask from
        # pad ids in the inputs, which Petals rejects: "Custom attention masks are not supported").
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = None
        wait_all_blocks(model, num_blocks, swarm, start_deadline)
        report["swarm_ready_s"] = round(time.monotonic() - began, 1)

        prompt_ids = [3 + (997 + i) % (vocab - 3) for i in range(args.prompt_tokens)]  # 1000.. , no ids 0-2
        for _ in range(args.warmup):
            row = run_concurrency(model, torch, 1, prompt_ids[:4], 2, deadline)
            if row["errors"]:
                report["errors"].extend(f"warm-up: {e}" for e in row["errors"])
        for n in args.concurrency:
            if time.monotonic() > deadline:
                report["errors"].append(f"no time left for concurrency {n}")
                break
            row = run_concurrency(model, torch, n, prompt_ids, args.new_tokens, deadline)
            report["errors"].extend(row.pop("errors"))
            session0_tokens = row.pop("_tokens")
            if args.verify and session0_tokens is not None and "verify" not in report:
                report["verify_petals_tokens"] = session0_tokens
            report["results"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        swarm.check_alive()
        if args.verify and "verify_petals_tokens" in report:
            # Greedy reference from plain transformers on the same directory: checks that Petals computed
            # the same model (GQA, tied embeddings, rope_theta, ...).
            from transformers import LlamaForCausalLM

            ref_model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
            ref_model.generation_config.eos_token_id = None
            ref_model.generation_config.pad_token_id = None
            with torch.inference_mode():
                ref = ref_model.generate(torch.tensor([prompt_ids]), max_new_tokens=args.new_tokens, do_sample=False)
            ref_tokens = ref[0, len(prompt_ids):].tolist()
            got = report.pop("verify_petals_tokens")
            report["verify"] = {"match": got == ref_tokens, "petals": got, "reference": ref_tokens}
            if got != ref_tokens:
                report["errors"].append("verify: Petals greedy tokens differ from the transformers reference")
        emit_and_exit(0 if not report["errors"] else 1)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001
        import traceback

        report["errors"].append(f"{type(exc).__name__}: {exc}")
        report["traceback"] = traceback.format_exc()[-4000:]
        for i in range(len(swarm.procs)):
            report["errors"].append(f"server {i} log tail:\n{swarm.tail(i)}")
        emit_and_exit(2)


if __name__ == "__main__":
    main()
