"""What weight quantization and activation codecs cost in quality, bytes and time, on SmolLM2's real weights.

The model runs as a 3-stage pipeline (blocks 0:10, 10:20, 20:30) in this process, and every hidden state
crosses the links exactly as in the swarm: the client sends a stage its input and the stage replies with
its output, each message encoded with the codec under test and decoded on arrival (6 crossings per step).

For every weight mode (none = float32, bf16, int8) and every codec it reports, against float32 weights with
uncompressed links:
- link bytes per decode step (one token, all 6 crossings) and per 128-token prefill;
- encode + decode time per crossing, for a decode step and a 128-token prefill chunk;
- top-1 agreement over the positions of real text (the docstrings of standard library modules that the
  semantic codec's calibration never saw), fed in 128-token chunks through the KV caches;
- the change in perplexity on that text;
- identity of greedy continuations of 20 prompts;
- for the semantic codec, how often a message fell back to the lossless codec.
Weight modes also get decode and prefill speed through all 30 blocks.
Prints tables, writes bench/results/eval_fidelity.json and bench/results/eval_fidelity.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeswarm.model.calibration import (
    CALIBRATION_MODULES,
    load_or_fit_basis,
    module_docs_text,
)
from edgeswarm.model.quantization import WEIGHT_QUANT_MODES
from edgeswarm.model.sources import ModelSource, open_model
from edgeswarm.model.span import SpanCache, TransformerSpan
from edgeswarm.protocol.codecs import (
    SemanticBasis,
    codec_names,
    decode_tensor,
    encode_semantic,
    encode_tensor,
    encoded_size,
)
from edgeswarm.swarm.head import ClientHead

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
EVAL_MODULES = ("json", "textwrap", "inspect", "dataclasses", "typing", "string", "shutil", "tempfile", "csv", "heapq")
STAGES = ((0, 10), (10, 20), (20, 30))
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is.",
    "Give three tips for staying focused.",
    "What does a compiler do?",
    "Name two planets of the solar system.",
    "How do plants make food?",
    "Write a Python function that adds two numbers.",
    "What is the boiling point of water?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "What is machine learning?",
    "Suggest a name for a coffee shop.",
    "How many days are in a leap year?",
    "Translate 'good morning' into French.",
    "What is the largest ocean on Earth?",
    "Give an example of a prime number.",
    "What is photosynthesis?",
    "How do I make a cup of tea?",
    "What is the speed of light?",
]


@dataclass
class LinkMeter:
    """Applies a codec at each crossing and counts its bytes and time."""

    codec: str
    basis: SemanticBasis | None
    bytes: int = 0
    seconds: float = 0.0
    messages: int = 0
    fallbacks: int = 0

    def cross(self, hidden: torch.Tensor, boundary: int) -> torch.Tensor:
        began = time.perf_counter()
        if self.codec == "semantic":
            encoding = encode_semantic(hidden, self.basis, boundary)
            message, self.fallbacks = encoding.message, self.fallbacks + int(encoding.fell_back)
        else:
            message = encode_tensor(hidden, "" if self.codec == "none" else self.codec)
        decoded = decode_tensor(message, bases={self.basis.digest: self.basis} if self.basis else None)
        self.seconds += time.perf_counter() - began
        self.bytes += encoded_size(message)
        self.messages += 1
        return decoded


@dataclass
class Pipeline:
    """Three stages with the client's head, one weight mode."""

    head: ClientHead
    stages: list[TransformerSpan]
    caches: list[SpanCache] = field(default_factory=list)

    def reset(self) -> None:
        self.caches = [SpanCache() for _ in self.stages]

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, start: int, link: LinkMeter) -> torch.Tensor:
        """Logits [batch, length, vocab] for `ids` appended at position `start`."""
        hidden = self.head.embed(ids)
        positions = torch.arange(start, start + ids.shape[1])[None].expand_as(ids)
        mask = torch.ones_like(ids, dtype=torch.bool)
        for stage, cache in zip(self.stages, self.caches):
            hidden = link.cross(hidden, stage.start)
            hidden = stage(hidden, positions, mask, cache)
            hidden = link.cross(hidden, stage.end)
        return self.head.logits(hidden)


def build_pipeline(source: ModelSource, quant: str) -> Pipeline:
    head = ClientHead(source.config, source.head_weights())
    stages = [
        TransformerSpan(source.config, a, b, (source.block_state(i) for i in range(a, b)), quant=quant) for a, b in STAGES
    ]
    return Pipeline(head, stages)


def eval_sequences(tokenizer, count: int, length: int) -> torch.Tensor:
    ids = tokenizer(module_docs_text(EVAL_MODULES), return_tensors="pt").input_ids[0]
    if ids.numel() < count * length:
        raise RuntimeError(f"only {ids.numel()} tokens of evaluation text, need {count * length}")
    return ids[: count * length].view(count, length)


def teacher_forced(pipeline: Pipeline, sequences: torch.Tensor, link: LinkMeter, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions and log-probabilities of the true next tokens, for every position but the last."""
    predictions, logprobs = [], []
    for sequence in sequences:
        pipeline.reset()
        logits = torch.cat(
            [pipeline.step(sequence[None, begin : begin + chunk], begin, link)[0] for begin in range(0, len(sequence), chunk)]
        )
        predictions.append(logits[:-1].argmax(-1))
        logprobs.append(torch.log_softmax(logits[:-1].float(), -1).gather(1, sequence[1:, None]).squeeze(1))
    return torch.cat(predictions), torch.cat(logprobs)


def greedy(pipeline: Pipeline, prompt: list[int], new_tokens: int, link: LinkMeter) -> list[int]:
    pipeline.reset()
    logits = pipeline.step(torch.tensor([prompt]), 0, link)[0, -1]
    tokens = []
    for index in range(new_tokens):
        tokens.append(int(logits.argmax()))
        logits = pipeline.step(torch.tensor([[tokens[-1]]]), len(prompt) + index, link)[0, -1]
    return tokens


def boundary_states(pipeline: Pipeline, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The real hidden states of `ids` at every stage boundary (float32 weights, no codec)."""
    hidden = pipeline.head.embed(ids)
    positions, mask = torch.arange(ids.shape[1])[None], torch.ones_like(ids, dtype=torch.bool)
    states = {STAGES[0][0]: hidden}
    for stage in pipeline.stages:
        hidden = stage(hidden, positions, mask)
        states[stage.end] = hidden
    return states


def link_costs(codec: str, basis: SemanticBasis | None, states: dict[int, torch.Tensor]) -> dict:
    """Bytes and median encode+decode time of the 6 crossings of one step, on the real hidden states
    at each boundary, and how many of those messages the semantic codec sent lossless."""
    timings, size, fallbacks = [], 0, 0
    for _ in range(7):
        meter = LinkMeter(codec, basis)
        for a, b in STAGES:
            meter.cross(states[a], a)
            meter.cross(states[b], b)
        timings.append(meter.seconds / meter.messages)
        size, fallbacks = meter.bytes, meter.fallbacks
    return {"bytes": size, "ms_per_crossing": 1000 * statistics.median(timings), "fallbacks": fallbacks}


@torch.inference_mode()
def weight_speed(pipeline: Pipeline, hidden_size: int) -> dict:
    """Decode tokens/s and prefill (128 tokens) tokens/s through all 30 blocks, one process."""
    torch.set_num_threads(1)
    x, one = torch.randn(1, 128, hidden_size), torch.randn(1, 1, hidden_size)
    mask, one_mask = torch.ones(1, 128, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)
    pipeline.reset()
    for stage, cache in zip(pipeline.stages, pipeline.caches):
        stage(x, torch.arange(128)[None], mask, cache)
    steps = []
    for index in range(24):
        began = time.perf_counter()
        for stage, cache in zip(pipeline.stages, pipeline.caches):
            stage(one, torch.tensor([[128 + index]]), one_mask, cache)
        steps.append(time.perf_counter() - began)
    torch.set_num_threads(2)
    prefills = []
    for _ in range(3):
        began = time.perf_counter()
        for stage in pipeline.stages:
            stage(x, torch.arange(128)[None], mask)
        prefills.append(time.perf_counter() - began)
    return {"decode_tokens_per_s": 1 / statistics.median(steps), "prefill_tokens_per_s": 128 / min(prefills)}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=5, help="512-token sequences of evaluation text")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--quants", nargs="*", default=list(WEIGHT_QUANT_MODES))
    parser.add_argument("--codecs", nargs="*", default=[name for name in codec_names()])
    parser.add_argument("--grid", action="store_true", help="every codec with every weight mode (default: codecs with float32 weights, weight modes with raw links)")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = open_model("default")
    tokenizer = source.tokenizer()
    basis = load_or_fit_basis(source)
    sequences = eval_sequences(tokenizer, args.sequences, 512)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        for text in PROMPTS[: args.prompts]
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    hidden_size = source.config.hidden_size
    rows, reference, sample = [], None, None
    for quant in args.quants:
        pipeline = build_pipeline(source, quant)
        speed = weight_speed(pipeline, hidden_size)
        torch.set_num_threads(2)
        codecs = args.codecs if args.grid or quant == "none" else ["none"]
        for codec in codecs:
            link = LinkMeter(codec, basis)
            began = time.perf_counter()
            predictions, logprobs = teacher_forced(pipeline, sequences, link, chunk=128)
            continuations = [greedy(pipeline, prompt, args.new_tokens, link) for prompt in prompts]
            if reference is None:  # the first run: float32 weights, uncompressed links
                reference = {"predictions": predictions, "nll": -logprobs.mean().item(), "greedy": continuations}
                sample = boundary_states(pipeline, sequences[:1, :128])
            decode_cost = link_costs(codec, basis, {b: state[:, -1:] for b, state in sample.items()})
            prefill_cost = link_costs(codec, basis, sample)
            nll = -logprobs.mean().item()
            row = {
                "quant": quant,
                "codec": codec,
                "weight_mb": sum(stage.weight_bytes for stage in pipeline.stages) / 1e6,
                **{f"weights_{key}": value for key, value in speed.items()},
                "decode_step_bytes": decode_cost["bytes"],
                "prefill_128_bytes": prefill_cost["bytes"],
                "bytes_reduction": link_costs("none", None, sample)["bytes"] / prefill_cost["bytes"],
                "prefill_messages_sent_lossless": prefill_cost["fallbacks"] if codec == "semantic" else None,
                "decode_ms_per_crossing": decode_cost["ms_per_crossing"],
                "prefill_ms_per_crossing": prefill_cost["ms_per_crossing"],
                "positions": int(predictions.numel()),
                "top1_agreement": (predictions == reference["predictions"]).float().mean().item(),
                "perplexity": math.exp(nll),
                "perplexity_change_pct": 100 * (math.exp(nll - reference["nll"]) - 1),
                "greedy_identical": sum(a == b for a, b in zip(continuations, reference["greedy"])),
                "greedy_prompts": len(prompts),
                "semantic_fallback_rate": link.fallbacks / link.messages if codec == "semantic" else None,
                "seconds": time.perf_counter() - began,
            }
            rows.append(row)
            print(
                f"{quant:5s} {codec:11s} x{row['bytes_reduction']:5.2f} top1 {row['top1_agreement']:.4f} "
                f"ppl {row['perplexity']:.3f} ({row['perplexity_change_pct']:+.2f}%) greedy "
                f"{row['greedy_identical']}/{len(prompts)} [{row['seconds']:.0f}s]",
                flush=True,
            )
    report = {
        "model": source.model_id,
        "stages": STAGES,
        "semantic_basis": {"digest": basis.digest, "rank": basis.rank(10), "calibration_modules": CALIBRATION_MODULES},
        "eval_modules": EVAL_MODULES,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_fidelity.json").write_text(json.dumps(report, indent=2))
    print_tables(rows)
    plot(rows, RESULTS / "eval_fidelity.png")


def print_tables(rows: list[dict]) -> None:
    print("\n| weights | codec | bytes/decode step | bytes/128-token prefill | × fewer | ms/crossing (decode, prefill) "
          "| top-1 agreement | perplexity (Δ) | greedy identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fallback = f" (fallback {row['semantic_fallback_rate']:.0%})" if row["semantic_fallback_rate"] is not None else ""
        print(
            f"| {row['quant']} | {row['codec']}{fallback} | {row['decode_step_bytes']} | {row['prefill_128_bytes']} "
            f"| {row['bytes_reduction']:.2f} | {row['decode_ms_per_crossing']:.2f}, {row['prefill_ms_per_crossing']:.2f} "
            f"| {100 * row['top1_agreement']:.2f}% | {row['perplexity']:.3f} ({row['perplexity_change_pct']:+.2f}%) "
            f"| {row['greedy_identical']}/{row['greedy_prompts']} |"
        )
    print("\n| weights | MB (30 blocks) | decode tokens/s | prefill tokens/s |")
    print("|---|---|---|---|")
    for row in rows:
        if row["codec"] == rows[0]["codec"]:
            print(f"| {row['quant']} | {row['weight_mb']:.0f} | {row['weights_decode_tokens_per_s']:.1f} | {row['weights_prefill_tokens_per_s']:.0f} |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for quant, marker in zip(WEIGHT_QUANT_MODES, "osD"):
        subset = [row for row in rows if row["quant"] == quant]
        axis.scatter([row["bytes_reduction"] for row in subset], [100 * row["top1_agreement"] for row in subset], marker=marker, label=f"weights {quant}")
        for row in subset:
            axis.annotate(row["codec"], (row["bytes_reduction"], 100 * row["top1_agreement"]), fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("link bytes: × fewer than float32 (128-token prefill)")
    axis.set_ylabel("top-1 agreement with float32 (%)")
    axis.set_title("SmolLM2-135M: activation codecs and weight modes")
    axis.axhline(99, color="grey", linestyle=":", linewidth=0.8)
    axis.axhline(95, color="grey", linestyle=":", linewidth=0.8)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
