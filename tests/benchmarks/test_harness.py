"""The benchmark harness runs on a tiny model: timing, accuracy, the floor and the tables."""

from pathlib import Path

from benchmarks import floor
from benchmarks.harness import accuracy, time_shape
from benchmarks.markdown import render
from pipeline.build import BuildOptions, build
from tests.backends.test_openvino import needs_openvino

ROOT = Path(__file__).resolve().parents[2]


def _tiny_fp32(checkpoint, recipe_for, artifacts: Path) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    """The tiny BERT checkpoint and its tforge fp32 model file."""
    folder = checkpoint("bert")
    outcome = build(
        recipe_for(folder, latency={"enabled": False}), BuildOptions(artifacts=artifacts)
    )
    return folder, str(outcome.run_dir / "models" / "fp32" / "model.onnx")


def _spec(folder: Path, contenders: list[dict]) -> dict:  # type: ignore[type-arg]
    return {
        "model": {
            "folder": str(folder),
            "inputs": ["input_ids", "attention_mask", "token_type_ids"],
            "pooling": "mean",
        },
        "evaluation": str(ROOT / "calibration" / "evaluation.jsonl"),
        "contenders": contenders,
    }


def test_harness_times_and_checks_contenders(
    checkpoint, recipe_for, shared_artifacts: Path
) -> None:
    folder, model = _tiny_fp32(checkpoint, recipe_for, shared_artifacts)
    spec = _spec(
        folder,
        [
            {"name": "PyTorch eager fp32", "kind": "torch", "path": None},
            {"name": "tforge fp32", "kind": "onnx", "path": model},
        ],
    )
    timing = time_shape(spec, batch=2, sequence=16, threads=1, warmup=1, rounds=5, passes=2)
    for result in timing["contenders"].values():
        assert len(result["passes"]) == 2
        assert all(p["runs"] == 5 for p in result["passes"])
        assert 0 < result["p50_ms"] <= result["p90_ms"]
        assert result["spread_pct"] >= 0
    acc = accuracy(spec, threads=1)
    assert acc["samples"] == 256
    assert acc["contenders"]["tforge fp32"]["mean_cosine"] > 0.99999
    assert acc["contenders"]["tforge fp32"]["max_abs_error"] < 1e-4
    assert acc["contenders"]["PyTorch eager fp32"]["max_abs_error"] == 0.0

    timing.update(model="tiny", flops=floor.encoder_flops(2, 16, 2, 32, 64))
    results = {
        "command": "test",
        "date": "today",
        "seconds": 1.0,
        "plan": {"rounds": 5, "passes": 2, "warmup": 1},
        "machine": {
            "hardware": {"cpu": "cpu", "physical_cores": 2, "cpu_flags": []},
            "versions": {"tforge": "0"},
            "peaks": {
                "uarch": "x",
                "fp32": 64,
                "int8": 256,
                "note": "",
                "clock_ghz": 3.0,
                "clock_source": "test",
                "fp32_gops_per_core": 192.0,
                "int8_gops_per_core": 768.0,
            },
        },
        "models": {
            "tiny": {
                "name": "tiny",
                "builds": [
                    {
                        "name": n,
                        "group": g,
                        "seconds": 1.0,
                        "peak_rss_mb": 1.0,
                        "size_mb": 1.0,
                        "note": "",
                        "error": None,
                    }
                    for n, g in (("PyTorch eager fp32", "PyTorch"), ("tforge fp32", "tforge"))
                ],
            }
        },
        "accuracy": {"tiny": acc},
        "timings": [timing],
    }
    text = render(results)
    assert "## tiny, 1 thread(s)" in text
    eager = timing["contenders"]["PyTorch eager fp32"]["p50_ms"]
    ours = timing["contenders"]["tforge fp32"]["p50_ms"]
    assert f"| tforge fp32 | {ours:.1f} | {eager / ours:.2f}x |" in text


def test_encoder_flops_by_hand() -> None:
    # One layer, b1, s2, h2, i4: 8*1*2*4 + 4*1*4*2 + 4*1*2*2*4 = 64 + 32 + 64
    assert floor.encoder_flops(1, 2, 1, 2, 4) == 160
    assert floor.fraction_of_peak(10**9, 1.0, 1.0, 1) == 1.0
    assert floor.fraction_of_peak(10**9, 1.0, None, 1) is None


@needs_openvino
def test_harness_runs_static_contenders_at_the_shape_they_time(
    checkpoint, recipe_for, shared_artifacts: Path
) -> None:
    folder, model = _tiny_fp32(checkpoint, recipe_for, shared_artifacts)
    spec = _spec(
        folder,
        [
            {"name": "cpu", "kind": "onnx", "path": model},
            {
                "name": "static",
                "kind": "onnx",
                "path": model,
                "target": "ort-openvino",
                "precision": "fp32",
                "static": True,
            },
        ],
    )
    timing = time_shape(spec, batch=2, sequence=16, threads=1, warmup=1, rounds=3, passes=1)
    assert timing["contenders"]["static"]["p50_ms"] > 0
    # Accuracy batches (32 texts, padded up to 128 tokens on the static one) match FP32.
    acc = accuracy(spec, threads=1)
    assert acc["contenders"]["static"]["mean_cosine"] > 0.99999
    assert acc["contenders"]["static"]["max_abs_error"] < 1e-4
