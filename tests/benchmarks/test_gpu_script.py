"""The GPU benchmark script, run on the CPU: every contender built, checked and timed.

Its numbers mean nothing here; the test proves the script works end to end before a GPU
session spends its few minutes of device time on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu import main
from pipeline.build import BuildOptions, build


def test_the_gpu_benchmark_runs_on_the_cpu(
    checkpoint, recipe_for, shared_artifacts: Path, tmp_path: Path
) -> None:
    source = checkpoint("bert")
    outcome = build(
        recipe_for(source, latency={"enabled": False}), BuildOptions(artifacts=shared_artifacts)
    )
    out = tmp_path / "gpu.json"
    results = main(
        [
            "--checkpoint",
            str(source),
            "--onnx",
            f"fp32={outcome.run_dir / 'models' / 'fp32'}",
            "--shapes",
            "b1s16,b2s16",
            "--runs",
            "3",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == results
    assert set(results["latency"]) == {"pytorch-fp32", "pytorch-fp16", "ort-fp32"}
    for timing in results["latency"].values():
        assert set(timing) == {"b1s16", "b2s16"} and all(t["runs"] == 3 for t in timing.values())
    accuracy = results["accuracy"]
    assert accuracy["pytorch-fp32"]["mean_cosine"] > 0.999999
    assert accuracy["ort-fp32"]["worst_cosine"] > 0.99999
    # FP16 eager differs from FP32, but only by rounding.
    assert 0.99 < accuracy["pytorch-fp16"]["worst_cosine"] < 1.0 + 1e-9
