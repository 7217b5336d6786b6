import json
from pathlib import Path

import pytest

from pipeline.artifacts import StageRecord
from pipeline.build import BuildOptions, build
from pipeline.errors import InputError
from pipeline.manifest import Manifest, check
from pipeline.report import build_report, render_json, render_markdown
from pipeline.report.model import json_schema, read_report


def test_check_is_truthy_and_says_what_would_pass() -> None:
    ok = check("gate", "fp32", "mean_cosine", 0.9995, 0.999, "min")
    bad = check("gate", "int8", "p50_ms", 12.5, 10.0, "max", shape="b1s128")
    missing = check(
        "gate", "fp32", "task_metric", None, 0.9, "min", note="the evaluation data has no labels"
    )
    assert ok and not bad and not missing
    assert str(ok) == "fp32 mean_cosine = 0.9995, limit >= 0.999: ok"
    assert str(bad) == "int8 p50_ms @b1s128 = 12.5, limit <= 10: FAILED (would pass with <= 12.5)"
    assert "not measured (the evaluation data has no labels)" in str(missing)
    # A near miss is printed with the digits that tell it from its limit.
    near = check("tolerance", "int8", "mean_cosine", 0.99899991, 0.999, "min")
    assert str(near) == (
        "int8 mean_cosine = 0.9989999, limit >= 0.999: FAILED (would pass with >= 0.9989999)"
    )
    over = check("gate", "int8", "max_abs_error", 0.0010000004, 0.001, "max")
    assert str(over).startswith("int8 max_abs_error = 0.0010000004, limit <= 0.001: FAILED")


def test_reports_are_pure_functions_of_the_manifest(
    checkpoint, recipe_for, shared_artifacts: Path
) -> None:
    outcome = build(recipe_for(checkpoint("bert")), BuildOptions(artifacts=shared_artifacts))
    text = (outcome.run_dir / "manifest.json").read_text()
    manifest = Manifest.parse(text, "manifest")
    again = build_report(manifest)
    assert render_json(again) == (outcome.run_dir / "report.json").read_text()
    assert render_markdown(again) == (outcome.run_dir / "report.md").read_text()

    markdown = render_markdown(again)
    fp32 = next(c for c in again.contenders if c.name == "fp32")
    lat = fp32.latency["b2s16"]
    assert f"{lat.p50_ms:.2f} / {lat.p90_ms:.2f} / {lat.p99_ms:.2f}" in markdown
    assert f"{lat.speedup:.2f}x" in markdown
    assert markdown.count("✅") == len(again.checks)
    assert again.passed


def test_report_schema_is_versioned_and_checked(tmp_path: Path) -> None:
    schema = json_schema()
    assert "schema_version" in schema["properties"]
    with pytest.raises(InputError, match="report schema version 0"):
        read_report(json.dumps({"schema_version": 0}), "old.json")
    with pytest.raises(InputError, match="not a tforge report"):
        read_report(json.dumps({"schema_version": 1, "run_id": "x"}), "partial.json")
    with pytest.raises(InputError, match="is not JSON"):
        Manifest.parse("{", "m.json")


def test_gpu_memory_is_shown_for_the_contenders_probed_on_the_gpu() -> None:
    """A build with GPU variants: PyTorch runs on the GPU, and the device memory each GPU
    contender holds gets its own column; CPU contenders show a dash there."""
    path = Path(__file__).parent / "fixtures" / "manifest.json"
    data = json.loads(path.read_text())
    latency = next(s for s in data["stages"] if s["step"] == "latency")
    latency["stats"].update(
        pytorch_device="cuda",
        memory_shape="b2s16",
        peak_rss_bytes={"pytorch": 900_000_000, "fp32": 300_000_000},
        device_bytes={"pytorch": 123_400_000, "fp32": 45_600_000},
    )
    report = build_report(Manifest.parse(json.dumps(data), "manifest"))
    contenders = {c.name: c for c in report.contenders}
    assert contenders["pytorch"].target == "torch-cuda"
    assert contenders["pytorch"].device_bytes == 123_400_000
    assert contenders["int8"].device_bytes is None
    markdown = render_markdown(report)
    assert "GPU memory MB |" in markdown and "the CUDA context not counted" in markdown
    rows = {line.split("|")[1].strip(): line for line in markdown.splitlines() if "|" in line}
    assert rows["pytorch (fp32, torch-cuda)"].rstrip().endswith("| 900.0 | 123.4 |")
    assert rows["int8 (int8, ort-cpu)"].rstrip().endswith("| – |")
    # A CPU build has no such column.
    latency["stats"].pop("device_bytes")
    cpu = build_report(Manifest.parse(json.dumps(data), "manifest"))
    assert "GPU memory" not in render_markdown(cpu)


def test_seven_bit_weights_chosen_for_the_cpu_are_said() -> None:
    """The recipe left reduce_range unset and the build chose 7-bit weights (no VNNI): the
    INT8 section says so and a note says why; a recipe that asked for them gets no note."""
    path = Path(__file__).parent / "fixtures" / "manifest.json"
    data = json.loads(path.read_text())
    for variant in data["recipe"]["variants"]:
        if variant.get("quantize"):
            variant["quantize"]["reduce_range"] = None
    for stage in data["stages"]:
        if stage["step"].startswith("quantize["):
            stage["stats"]["weight_bits"] = 7 if stage["step"] == "quantize[int8]" else 8
    report = build_report(Manifest.parse(json.dumps(data), "manifest"))
    assert next(c for c in report.contenders if c.name == "int8").quantization["weight_bits"] == 7
    assert "**int8** (dynamic, 7-bit weights)" in render_markdown(report)
    said = [n for n in report.notes if "7-bit INT8 weights" in n]
    assert len(said) == 1 and said[0].startswith("int8: 7-bit INT8 weights, because this CPU")
    data["recipe"]["variants"][1]["quantize"]["reduce_range"] = True
    asked = build_report(Manifest.parse(json.dumps(data), "manifest"))
    assert not [n for n in asked.notes if "7-bit INT8 weights" in n]


def test_a_limit_is_read_against_the_floor_of_the_device_the_variant_ran_on() -> None:
    """A GPU build's floor ran on the GPU: a failed limit of a variant on the GPU is read
    against it, one of a CPU variant (or a TensorRT variant's ONNX graph) is not."""
    path = Path(__file__).parent / "fixtures" / "manifest.json"
    data = json.loads(path.read_text())
    floor = {k: v for k, v in data["stages"][0].items()}
    floor.update(step="floor", stage="floor", key="f" * 64, config={}, inputs={}, outputs={})
    floor["stats"] = {"fp32": {"device": "cuda", "max_abs_error": 2e-5}}
    data["stages"].insert(3, floor)
    failed = {
        "source": "tolerance",
        "variant": "fp32",
        "metric": "max_abs_error",
        "shape": None,
        "value": 3e-5,
        "limit": 1e-5,
        "kind": "max",
        "passed": False,
        "note": None,
    }
    data["checks"].append(failed)

    def noted(target: str, variant: str = "fp32") -> bool:
        data["recipe"]["variants"][0]["target"] = target
        data["checks"][-1]["variant"] = variant
        report = build_report(Manifest.parse(json.dumps(data), "manifest"))
        return any("beyond PyTorch's own in fp32" in n for n in report.notes)

    assert noted("ort-cuda")
    assert not noted("ort-cpu")
    assert not noted("tensorrt", "fp32:onnx")


def _record(step: str, stats: dict) -> StageRecord:
    return StageRecord(
        step=step,
        stage=step.split("[")[0],
        key="k",
        config={},
        inputs={},
        outputs={},
        stats=stats,
        seconds=0.0,
    )


def test_gates_on_the_task_metric_drop_and_an_exact_speedup() -> None:
    """max_task_metric_drop reads the side-by-side drop; min_speedup compares the exact ratio
    (1.999995x is not 2x, though it rounds to it)."""
    from pipeline.recipe import parse_recipe
    from pipeline.report.checks import gate_checks

    recipe = parse_recipe(
        {
            "model": {"task": "sequence-classification"},
            "variants": [{"name": "int8", "precision": "int8"}],
            "gates": {"max_task_metric_drop": 0.01, "min_speedup": 2.0},
        },
        "recipe",
    )
    latency = {
        "shapes": ["b1s128"],
        "contenders": {
            "pytorch": {"b1s128": {"p50_ms": 19.99995}},
            "int8": {"b1s128": {"p50_ms": 10.0}},
        },
    }
    stages = [
        _record("verify[int8]", {"task_metric": 0.8, "task_metric_drop": 0.1}),
        _record("latency", latency),
    ]
    drop, speedup = gate_checks(recipe, stages)
    assert not drop and drop.value == 0.1 and drop.metric == "task_metric_drop"
    assert not speedup and speedup.value == pytest.approx(1.999995)
    unlabelled = gate_checks(recipe, [_record("verify[int8]", {}), _record("latency", latency)])
    assert unlabelled[0].note == "the evaluation data has no labels"
