"""tforge's decoder fusions beside transformers' own (``OnnxConfig(ort_fusions="cpu")``).

Both fuse the same exported graphs: the ``fp32-unfused`` variant of a
``benchmarks/smollm2_fusions.yaml`` build (the graphs as exported), fused by transformers'
``fuse_for_onnxruntime(model, "cpu")``, against that build's ``fp32`` (tforge's fusions). Each is
timed per decode step, interleaved, at batch 1 and 8, and compared with the unfused graphs
teacher-forced on a left-padded batch (one row padded by 5 tokens): the largest logit difference
and the share of steps whose most likely token is the unfused graph's.

    tforge build benchmarks/smollm2_fusions.yaml
    python -m benchmarks.decoder_fusion_peer --run artifacts/runs/latest
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEPS = 32


def transformers_fused(source: Path, out: Path) -> Path:
    """The graphs in ``source`` fused by transformers' exporter for ONNX Runtime's CPU provider."""
    import shutil

    import onnx_ir as ir
    from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime

    from pipeline.decoders.export import DECODE, PREFILL, share_weights

    out.mkdir(parents=True)
    for name in (PREFILL, DECODE):
        model = ir.load(source / name)
        fuse_for_onnxruntime(model, "cpu")
        ir.save(model, out / name, external_data=f"{name}.data")
    share_weights(out)
    for item in source.iterdir():
        if item.suffix in (".json", ".jinja"):
            shutil.copyfile(item, out / item.name)
    return out


def measure(folders: dict[str, Path], threads: int, rounds: int = 4) -> dict[str, Any]:
    from pipeline.decoders import OrtGenerator

    generators = {name: OrtGenerator(folder, threads) for name, folder in folders.items()}
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {name: {} for name in folders}
    for batch in (1, 8):
        ids = rng.integers(100, 40000, size=(batch, 32)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[-1, :5] = 0  # the last row left-padded
        baseline = generators["unfused"].generate(ids, mask, STEPS)
        steps: dict[str, list[float]] = {name: [] for name in folders}
        logits: dict[str, list[np.ndarray]] = {}
        for round_ in range(rounds):
            for name, generator in generators.items():
                times: list[float] = []
                run = generator.step_logits(ids, mask, baseline.tokens, STEPS, times=times)
                logits[name] = run.logits
                if round_:  # the first round warms up
                    steps[name].extend(times[1:])
        for name in folders:
            pairs = list(zip(logits["unfused"], logits[name], strict=True))
            results[name][f"b{batch}"] = {
                "decode_ms": round(1e3 * statistics.median(steps[name]), 3),
                "max_logit_difference": float(max(np.abs(a - b).max() for a, b in pairs)),
                "agreement": float(
                    np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in pairs])
                ),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="A smollm2_fusions build's run.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    models = args.run / "models"
    if not (models / "fp32-unfused").is_dir() or not (models / "fp32").is_dir():
        raise SystemExit(
            f"{args.run} has no fp32 and fp32-unfused variants: build the fusions recipe"
        )
    import transformers

    with tempfile.TemporaryDirectory() as work:
        folders = {
            "unfused": models / "fp32-unfused",
            "tforge": models / "fp32",
            "transformers": transformers_fused(models / "fp32-unfused", Path(work) / "tf"),
        }
        figures = measure(folders, args.threads)
    from benchmarks.markdown import record

    record(
        "decoder_fusion_peer",
        {
            "command": "tforge build benchmarks/smollm2_fusions.yaml && "
            "python -m benchmarks.decoder_fusion_peer --run <run folder>",
            "run_id": args.run.name,
            "transformers": transformers.__version__,
            "threads": args.threads,
            "results": figures,
        },
    )


if __name__ == "__main__":
    main()
