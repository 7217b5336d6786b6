"""Record a decoder build (``tforge build models/smollm2.yaml``) in BENCHMARKS.md.

The build itself measures: every variant's greedy tokens, teacher-forced agreement, logits and
perplexity against PyTorch on the recipe's prompts, and prefill / per-token decode latency beside
PyTorch eager with its cache, interleaved in one process. This script copies those figures from
the run's report.json into benchmarks/results.json ("decoder_build") and re-renders BENCHMARKS.md.

    tforge build models/smollm2.yaml
    python -m benchmarks.decoder_build --run artifacts/runs/latest

Fused against unfused graphs, the same variants with ``optimize: none`` beside them:

    tforge build benchmarks/smollm2_fusions.yaml
    python -m benchmarks.decoder_build --run artifacts/runs/latest --fusions
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
ACCURACY = (
    "token_match",
    "sequence_match",
    "agreement",
    "max_abs_error",
    "perplexity",
    "perplexity_increase",
)


FUSIONS_NOTE = (
    "Fused (`optimize: ort`): RMSNorm and its residual add into (Skip)SimplifiedLayerNormalization, "
    "rotary embeddings into RotaryEmbedding with a cos/sin table, each layer's attention with "
    "its cache update into one GroupQueryAttention, and the q/k/v and gate/up projections packed "
    "into one MatMul each. "
    "`-unfused` is the same variant as exported (`optimize: none`). The FP32 logits stay within "
    "1e-4 of PyTorch either way. Quantized variants change a little with the order of the "
    "arithmetic (MatMulNBits quantizes its input activations per block, and a near tie can flip): "
    "free-running token match is the most sensitive figure, teacher-forced agreement and "
    "perplexity move by noise."
)


BUILD_NOTE = (
    "`int4-grid` keeps the GGUF file's own Q4_1 grid (`quantize: {keep_grid: true, compute: "
    "float}`): its 4-bit weights equal the reference's, the Q8_0 LM head stays float, and "
    "float products keep the logits within float rounding, so it generates PyTorch's tokens. "
    "It decodes faster than FP32 at batch 1 but slower than the rounded variants, and slower "
    "than FP32 at 8 rows and in the prefill: ONNX Runtime's float-product MatMulNBits kernel "
    "and the 120 float remainder products (a block minimum that no whole zero point holds) "
    "cost more there than the FP32 GEMM. "
    "`fp16` holds weights, activations and the KV cache in float16 (half the size). ONNX "
    "Runtime's x86 CPU provider runs its normalisation, rotary and attention ops in float16 "
    "kernels but has no float16 MatMul: it runs the MatMuls in float32 on the float16 weights "
    "and inputs and rounds their outputs to float16 (seen in the session's optimized graph). "
    "So its figures are float16's rounding between ops (token match 0.991, agreement 0.9995, "
    "above PyTorch fp16's, which rounds after each of its smaller ops), its latency is no "
    "float16 speed (within 10% of FP32 here), and its peak RSS holds the float32 copies of "
    "the weights the session folds its weight Casts into. "
    "`int8-block` and `int4` round the weights onto a new grid and quantize the activations "
    "per block: near ties flip and greedy continuations drift. "
    "*PyTorch fp16 / bf16 (floor)* is PyTorch itself cast whole to that precision "
    "(`generation.floor`), verified the same way: on these prompts even fp16 flips near ties "
    "(token match 0.95), and bf16's figures are of `int8-block`'s order."
)


def summary(report: dict[str, Any], recipe: str, flags: str = "") -> dict[str, Any]:
    """The figures BENCHMARKS.md shows, from a text-generation build's report.json."""
    if report.get("task") != "text-generation":
        raise SystemExit(
            f"{report.get('run_id')} is a {report.get('task')} build, not text-generation"
        )
    contenders = {}
    for c in report["contenders"]:
        contenders[c["name"]] = {
            "precision": c["precision"],
            "accuracy": {k: (c["accuracy"] or {}).get(k) for k in ACCURACY}
            if c["accuracy"]
            else None,
            "latency": {
                shape: {k: lat[k] for k in ("p50_ms", "p90_ms", "throughput", "speedup", "runs")}
                for shape, lat in c["latency"].items()
            },
            "size_mb": round(c["size_bytes"] / 1e6, 1) if c["size_bytes"] else None,
            "peak_rss_mb": round(c["peak_rss_bytes"] / 1e6, 1) if c["peak_rss_bytes"] else None,
            "quantization": {
                k: (c["quantization"] or {}).get(k) for k in ("method", "block_size", "compute")
            }
            if c["quantization"]
            else None,
        }
    first = next(c for c in report["contenders"] if c["accuracy"])["accuracy"]
    return {
        "command": f"tforge build {recipe} && python -m benchmarks.decoder_build --run <run folder>"
        + flags,
        "run_id": report["run_id"],
        "model": report["model"],
        "threads": report["threads"],
        "prompts": first["prompts"],
        "new_tokens": first["new_tokens"],
        "reference_perplexity": first["reference_perplexity"],
        "shapes": report["shapes"],
        "contenders": contenders,
        "floor": {
            precision: {k: figures.get(k) for k in ACCURACY}
            for precision, figures in (report.get("floor") or {}).items()
        },
        "stages": {s["step"]: s["seconds"] for s in report["stages"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="The build's run folder.")
    parser.add_argument("--recipe", default=None)
    parser.add_argument(
        "--fusions",
        action="store_true",
        help="The build of benchmarks/smollm2_fusions.yaml: recorded as 'Decoder fusions'.",
    )
    args = parser.parse_args()
    report = json.loads((args.run / "report.json").read_text())
    from benchmarks.markdown import record

    if args.fusions:
        recipe = args.recipe or "benchmarks/smollm2_fusions.yaml"
        record(
            "decoder_fusions",
            {
                **summary(report, recipe, " --fusions"),
                "title": "Decoder fusions",
                "note": FUSIONS_NOTE,
            },
        )
    else:
        record(
            "decoder_build",
            {**summary(report, args.recipe or "models/smollm2.yaml"), "note": BUILD_NOTE},
        )


if __name__ == "__main__":
    main()
