"""The command line through click's CliRunner: exit codes, files, and one-line errors."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


FAST = """
shapes: {batch: [1], sequence: [16]}
data: {max_samples: 16, max_length: 32}
latency: {warmup: 1, runs: 3, threads: 1, memory: false}
"""


def no_runs(artifacts: Path) -> bool:
    runs = artifacts / "runs"
    return not runs.exists() or not [p for p in runs.iterdir() if p.name != "latest"]


@pytest.mark.slow
def test_build_with_model_and_task_on_defaults(checkpoint, tmp_path: Path) -> None:
    """No recipe: default shapes (b1, b8 at s128), 50 runs, peak memory in fresh processes."""
    code, output = invoke(
        "build",
        "--model",
        str(checkpoint("bert")),
        "--task",
        "feature-extraction",
        "--artifacts",
        str(tmp_path),
        "--quiet",
    )
    assert code == 0, output
    assert output.startswith("passed: report")
    run = next(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    report = json.loads((run / "report.json").read_text())
    assert report["shapes"] == ["b1s128", "b8s128"]
    assert all(c["latency"]["b8s128"]["runs"] == 50 for c in report["contenders"])
    rss = {c["name"]: c["peak_rss_bytes"] for c in report["contenders"]}
    # A process with only onnxruntime needs far less than one with torch and transformers.
    assert 0 < rss["fp32"] < rss["pytorch"]
    assert (run / "models" / "fp32" / "model.onnx").is_file()

    code, output = invoke("report", str(run), "--format", "json")
    assert code == 0
    assert json.loads(output)["run_id"] == run.name


def test_build_recipe_prints_table_and_caches(checkpoint, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, f"name: cli\nmodel: {{source: {checkpoint('distilbert')}}}\n{FAST}"
    )
    code, output = invoke("build", str(recipe), "--artifacts", str(tmp_path / "a"))
    assert code == 0, output
    assert "b1s16 p50 ms" in output and "fp32" in output
    assert "(0 of 7 steps from cache)" in output
    code, output = invoke("build", str(recipe), "--artifacts", str(tmp_path / "a"))
    assert "(7 of 7 steps from cache)" in output


def test_dry_run_and_print_recipe_do_no_work(checkpoint, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"model: {{source: {checkpoint('bert')}}}\n{FAST}")
    code, output = invoke("build", str(recipe), "--dry-run", "--artifacts", str(tmp_path / "a"))
    assert code == 0
    rows = {
        line.split("│")[1].strip(): line.split("│")[4].strip()
        for line in output.splitlines()
        if line.count("│") >= 5
    }
    assert rows == {
        "load": "run",
        "export": "run (after its inputs)",
        "reference": "run (after its inputs)",
        "floor": "run (after its inputs)",
        "optimize[fp32]": "run (after its inputs)",
        "verify[fp32]": "run (after its inputs)",
        "latency": "run (after its inputs)",
    }
    code, output = invoke("build", str(recipe), "--print-recipe")
    assert code == 0
    assert "task: feature-extraction" in output and "runs: 3" in output
    assert not (tmp_path / "a" / "runs").exists()
    code, output = invoke("build", str(recipe), "--print-recipe", "--dry-run")
    assert code == 2 and "pass one" in output


def test_failed_gate_exits_3_and_still_writes_the_report(checkpoint, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, f"model: {{source: {checkpoint('bert')}}}\n{FAST}gates: {{min_speedup: 1000}}\n"
    )
    code, output = invoke("build", str(recipe), "--artifacts", str(tmp_path / "a"), "--quiet")
    assert code == 3
    assert "failed: 1 check(s) failed, first: fp32 speedup @b1s16" in output
    assert "would pass with >=" in output
    run = next(p for p in (tmp_path / "a" / "runs").iterdir() if p.name != "latest")
    assert json.loads((run / "report.json").read_text())["passed"] is False


def _bad_checkpoint(kind: str, good: Path, tmp_path: Path) -> Path:
    folder = tmp_path / kind
    if kind == "missing":
        return folder
    shutil.copytree(good, folder)
    if kind == "no-config":
        (folder / "config.json").unlink()
    elif kind == "no-weights":
        (folder / "model.safetensors").unlink()
    elif kind == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == "pickle":
        import torch
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        torch.save({**tensors, "hook": _Hook()}, folder / "pytorch_model.bin")
    return folder


class _Hook:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("unpickled",))


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("missing", "does not exist"),
        ("no-config", "has no config.json"),
        ("no-weights", "has no weights"),
        ("truncated", "damaged or truncated"),
        ("pickle", "refuses to unpickle"),
    ],
)
def test_bad_checkpoints_give_one_line_and_exit_1(
    checkpoint, tmp_path: Path, kind: str, fragment: str
) -> None:
    folder = _bad_checkpoint(kind, checkpoint("bert"), tmp_path)
    artifacts = tmp_path / "artifacts"
    code, output = invoke("build", "--model", str(folder), "--artifacts", str(artifacts))
    assert code == 1, output
    assert output.startswith("error: ") and fragment in output
    assert "Traceback" not in output and "unpickled" not in output
    assert no_runs(artifacts)


def test_architecture_the_exporter_cannot_handle(tmp_path: Path) -> None:
    import torch
    import transformers

    from tests.tiny import save_tokenizer

    folder = tmp_path / "longformer"
    torch.manual_seed(0)
    config = transformers.LongformerConfig(
        vocab_size=600,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
        attention_window=[8],
        pad_token_id=0,
    )
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    save_tokenizer(folder, ["input_ids", "attention_mask"])
    recipe = write_recipe(tmp_path, f"model: {{source: {folder}}}\n{FAST}")
    code, output = invoke("build", str(recipe), "--artifacts", str(tmp_path / "a"))
    assert code == 1
    assert "error: longformer cannot be exported to ONNX" in output
    assert "Traceback" not in output
    assert no_runs(tmp_path / "a")


@pytest.mark.parametrize(
    ("recipe", "fragment"),
    [
        ("model:\n  task: [oops\n", "YAML syntax error at line"),
        ("modle: {}\n", "unknown field 'modle'"),
        ("shapes: {batch: one}\n", "shapes.batch: 'one'"),
        ("model: {task: summarization}\n", "model.task: 'summarization' is not allowed"),
    ],
)
def test_recipe_mistakes_exit_2(tmp_path: Path, recipe: str, fragment: str) -> None:
    code, output = invoke(
        "build", str(write_recipe(tmp_path, recipe)), "--artifacts", str(tmp_path / "a")
    )
    assert code == 2
    assert fragment in output
    assert "Traceback" not in output


def test_unknown_task_option_is_a_usage_error(checkpoint) -> None:
    code, output = invoke("build", "--model", str(checkpoint("bert")), "--task", "summarization")
    assert code == 2
    assert "Invalid value for '--task'" in output


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "is empty"),
        ("this is not json\n", "line 1 is not JSON"),
        ('{"sentence": "x"}\n', "has no field 'text'"),
    ],
)
def test_bad_evaluation_files_fail_before_any_work(
    checkpoint, tmp_path: Path, content: str, fragment: str
) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text(content)
    recipe = write_recipe(
        tmp_path, f"model: {{source: {checkpoint('bert')}}}\ndata: {{evaluation: {data}}}\n"
    )
    code, output = invoke("build", str(recipe), "--artifacts", str(tmp_path / "a"))
    assert code == 1
    assert fragment in output
    assert not (tmp_path / "a" / "cache").exists() or not list(
        (tmp_path / "a" / "cache").rglob("record.json")
    )


def test_output_folder_not_writable(checkpoint, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, output = invoke(
        "build", "--model", str(checkpoint("bert")), "--artifacts", str(blocker / "artifacts")
    )
    assert code == 1
    assert "is not writable" in output and "--artifacts" in output


def test_sequence_longer_than_the_model_allows(checkpoint, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, f"model: {{source: {checkpoint('bert')}}}\nshapes: {{sequence: [512]}}\n"
    )
    code, output = invoke("build", str(recipe), "--artifacts", str(tmp_path / "a"))
    assert code == 2  # the recipe's shapes, not the model, are wrong
    assert "exceed the model's maximum of 128 tokens" in output
    assert no_runs(tmp_path / "a")


def test_build_without_recipe_or_model_is_usage() -> None:
    code, output = invoke("build")
    assert code == 2
    assert "give a RECIPE file or --model PATH" in output


def test_inspect_an_exported_model(checkpoint, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"model: {{source: {checkpoint('bert')}}}\n{FAST}")
    code, _ = invoke(
        "build", str(recipe), "--artifacts", str(tmp_path), "--quiet", "--run-id", "r1"
    )
    assert code == 0
    code, output = invoke("inspect", str(tmp_path / "runs" / "r1" / "models" / "fp32"), "--json")
    info = json.loads(output)
    assert code == 0
    assert info["opset"]["ai.onnx"] == 20
    assert [i["name"] for i in info["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert info["inputs"][0]["shape"] == ["batch", "sequence"]
    # The fused graph: per layer one Attention, and three MatMuls left (output, FFN in and out).
    assert info["ops"]["com.microsoft.Attention"] == 2
    assert info["ops"]["MatMul"] == 6
    code, output = invoke(
        "inspect", str(tmp_path / "runs" / "r1" / "models" / "fp32" / "model.onnx")
    )
    assert code == 0 and "LayerNormalization" in output


def test_inspect_rejects_non_onnx(tmp_path: Path) -> None:
    (tmp_path / "x.onnx").write_bytes(b"definitely not protobuf \x00\xff")
    code, output = invoke("inspect", str(tmp_path / "x.onnx"))
    assert code == 1
    assert "is not an ONNX model" in output
    # An empty file parses as an empty protobuf message: still not a model.
    (tmp_path / "empty.onnx").write_bytes(b"")
    code, output = invoke("inspect", str(tmp_path / "empty.onnx"))
    assert code == 1 and "is not an ONNX model (it holds no graph)" in output


def test_inspect_names_what_is_missing(tmp_path: Path) -> None:
    """A decoder's folder holds two graphs; a graph whose weights file stayed behind."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    folder = tmp_path / "decoder"
    folder.mkdir()
    model = helper.make_model(graph)
    onnx.save(
        model,
        str(folder / "prefill.onnx"),
        save_as_external_data=True,
        location="weights.onnx.data",
        size_threshold=0,
    )
    onnx.save(helper.make_model(graph), str(folder / "decode.onnx"))
    code, output = invoke("inspect", str(folder))
    assert code == 1 and "has no model.onnx (it holds decode.onnx, prefill.onnx" in output
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "prefill.onnx").write_bytes((folder / "prefill.onnx").read_bytes())
    code, output = invoke("inspect", str(lone / "prefill.onnx"))
    assert code == 1 and "keeps its weights in weights.onnx.data, which is not beside it" in output
    assert "Traceback" not in output
    code, _ = invoke("inspect", str(folder / "prefill.onnx"))
    assert code == 0


def test_report_and_compare_refuse_what_is_not_a_run(checkpoint, tmp_path: Path) -> None:
    """An .onnx file, a report.json given to `report`: one line each, no traceback."""
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\xff\xfe\x00")
    for command in (["report"], ["compare", str(tmp_path / "model.onnx")]):
        code, output = invoke(*command, str(tmp_path / "model.onnx"))
        assert code == 1 and "is not a text file, so not a tforge" in output, output
        assert "Traceback" not in output
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": 3, "contenders": []}))
    code, output = invoke("report", str(tmp_path / "report.json"))
    assert code == 1 and "is a report.json, not a manifest" in output
    (tmp_path / "broken.json").write_text('{"a": 1,\n "b": }')
    code, output = invoke("compare", str(tmp_path / "broken.json"), str(tmp_path / "broken.json"))
    assert code == 1 and "is not JSON (Expecting value at line 2, column 7)" in output


def test_doctor_lists_targets() -> None:
    code, output = invoke("doctor", "--json")
    assert code == 0
    findings = json.loads(output)
    targets = {t["name"]: t for t in findings["targets"]}
    assert targets["ort-cpu"]["available"] is True
    assert set(targets) == {"ort-cpu", "ort-openvino", "ort-cuda", "tensorrt"}
    for target in targets.values():
        assert target["detail"]


def test_report_rejects_a_non_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    code, output = invoke("report", str(tmp_path))
    assert code == 1
    assert "schema version 99" in output


def test_a_short_calibration_file_fails_before_any_stage(checkpoint, tmp_path: Path) -> None:
    data = tmp_path / "calibration.jsonl"
    data.write_text('{"text": "one sentence."}\n{"text": "another one."}\n')
    recipe = write_recipe(
        tmp_path,
        f"""
model: {{source: {checkpoint("bert")}}}
data: {{calibration: {data}}}
variants:
  - name: static
    precision: int8
    quantize: {{method: static, calibration: {{samples: 64}}}}
""",
    )
    artifacts = tmp_path / "artifacts"
    code, output = invoke("build", str(recipe), "--artifacts", str(artifacts))
    assert code == 1, output
    assert output.startswith("error: ") and "has 2 samples; 64 are asked for" in output
    assert "at most 2" in output and "Traceback" not in output
    assert no_runs(artifacts) and not list(artifacts.glob("cache/*/*"))  # no stage ran


def _run(artifacts: Path, run_id: str) -> Path:
    return artifacts / "runs" / run_id


def _built_with_a_fast_baseline(checkpoint, tmp_path: Path) -> tuple[tuple[str, ...], Path, Path]:  # type: ignore[no-untyped-def]
    """Run "one" of a tiny build, and its report made ten times faster (tight timings)."""
    recipe = write_recipe(tmp_path, f"model: {{source: {checkpoint('bert')}}}\n{FAST}")
    artifacts = tmp_path / "a"
    base = ("build", str(recipe), "--artifacts", str(artifacts), "--quiet")
    assert invoke(*base, "--run-id", "one")[0] == 0
    data = json.loads((_run(artifacts, "one") / "report.json").read_text())
    for contender in data["contenders"]:
        for lat in contender["latency"].values():
            for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms"):
                lat[key] = lat["p50_ms"] / 10
    baseline = tmp_path / "fast.json"
    baseline.write_text(json.dumps(data))
    return base, artifacts, baseline


def test_build_against_a_baseline_reports_and_gates_the_comparison(
    checkpoint, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, f"model: {{source: {checkpoint('bert')}}}\n{FAST}")
    artifacts = tmp_path / "a"
    base = ("build", str(recipe), "--artifacts", str(artifacts), "--quiet")
    assert invoke(*base, "--run-id", "one")[0] == 0
    # Latency of 3 runs on a tiny model is noise: this test is about accuracy and variants.
    loose = ("--max-latency-regression", "100000")
    code, output = invoke(
        *base, "--run-id", "two", "--baseline", str(_run(artifacts, "one")), *loose
    )
    assert code == 0, output
    two = _run(artifacts, "two")
    report = json.loads((two / "report.json").read_text())
    assert report["comparison"]["baseline_run"] == "one" and report["comparison"]["passed"]
    assert "## `two` against baseline `one`: no regression" in (two / "report.md").read_text()
    assert 'name="tforge.compare"' in (two / "junit.xml").read_text()
    assert "against baseline" in (two / "report.html").read_text()

    # A baseline that had a variant this build lacks: a regression, exit 3, and still reported.
    data = json.loads((_run(artifacts, "one") / "report.json").read_text())
    extra = next(c for c in data["contenders"] if c["name"] == "fp32")
    data["contenders"].append({**extra, "name": "int8"})
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(data))
    code, output = invoke(*base, "--run-id", "three", "--baseline", str(baseline), *loose)
    assert code == 3, output
    assert "REGRESSION int8 variant: missing" in output
    assert "failed: 1 regression(s) against the baseline, first: int8 variant: missing" in output
    assert json.loads((_run(artifacts, "three") / "report.json").read_text())["passed"] is False


def test_a_latency_regression_is_re_measured_before_it_is_declared(
    checkpoint, tmp_path: Path
) -> None:
    """A baseline ten times faster with tight timings: the regression is real in every run."""
    base, artifacts, baseline = _built_with_a_fast_baseline(checkpoint, tmp_path)
    code, output = invoke(
        *base,
        "--run-id",
        "two",
        "--baseline",
        str(baseline),
        "--confirm",
        "1",
        "--latency-basis",
        "p50",
    )
    assert code == 3, output
    assert "REGRESSION fp32 p50_ms @b1s16: regression" in output
    assert "in all 2 measurements" in output
    manifest = json.loads((_run(artifacts, "two") / "manifest.json").read_text())
    latency = next(s for s in manifest["stages"] if s["step"] == "latency")
    assert latency["cached"] is False  # re-measured, not served from the store
    assert manifest["build"]["comparison"]["remeasured"] == 1


def test_compare_re_measures_a_run_folder_before_declaring_a_latency_regression(
    checkpoint, tmp_path: Path
) -> None:
    _, artifacts, baseline = _built_with_a_fast_baseline(checkpoint, tmp_path)
    run = _run(artifacts, "one")
    code, output = invoke(
        "compare", str(baseline), str(run), "--remeasure", "1", "--quiet", "--latency-basis", "p50"
    )
    assert code == 3, output
    assert (
        "REGRESSION fp32 p50_ms @b1s16: regression" in output and "in all 2 measurements" in output
    )
    # The re-measurement is a build of its own (latency re-run, the rest from the cache).
    runs = [p for p in (artifacts / "runs").iterdir() if p.name not in ("latest", "one")]
    assert len(runs) == 1
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert [s["step"] for s in manifest["stages"] if not s["cached"]] == ["latency"]


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorrt") is not None,
    reason="needs a machine without tensorrt (its variant must be unbuildable here)",
)
def test_skip_unavailable_leaves_out_what_this_machine_cannot_build(
    checkpoint, tmp_path: Path
) -> None:
    """Without the flag, a TensorRT variant on a machine without TensorRT refuses the build
    before any stage; with it, the build goes on without that variant and says so."""
    variants = "variants: [{name: fp32}, {name: trt16, target: tensorrt, precision: fp16}]\n"
    recipe = write_recipe(
        tmp_path, f"name: skip\nmodel: {{source: {checkpoint('bert')}}}\n{FAST}{variants}"
    )
    artifacts = tmp_path / "a"
    code, output = invoke("build", str(recipe), "--artifacts", str(artifacts))
    assert code != 0 and "target tensorrt is not available on this machine" in output
    assert "Traceback" not in output and no_runs(artifacts)
    # The plan of a dry run leaves it out the same way.
    code, output = invoke(
        "build", str(recipe), "--artifacts", str(artifacts), "--skip-unavailable", "--dry-run"
    )
    assert code == 0 and "would skip variant trt16: target tensorrt" in output
    assert "compile[trt16]" not in output and "verify[fp32]" in output
    # Without the flag, the plan of CPU and GPU variants timed together is refused.
    code, output = invoke("build", str(recipe), "--artifacts", str(artifacts), "--dry-run")
    assert code == 2 and "fp32 (ort-cpu) run on the CPU and trt16 (tensorrt) on the GPU" in output
    code, output = invoke(
        "build", str(recipe), "--artifacts", str(artifacts), "--skip-unavailable", "--run-id", "s"
    )
    assert code == 0, output
    report = json.loads((artifacts / "runs" / "s" / "report.json").read_text())
    assert [c["name"] for c in report["contenders"]] == ["pytorch", "fp32"]
    assert any(
        n.startswith("trt16: left out of this build (--skip-unavailable): target tensorrt")
        for n in report["notes"]
    )
    manifest = json.loads((artifacts / "runs" / "s" / "manifest.json").read_text())
    assert list(manifest["build"]["skipped_variants"]) == ["trt16"]
    assert [v["name"] for v in manifest["recipe"]["variants"]] == ["fp32"]
    # Nothing left to build is refused, naming the variants.
    only = write_recipe(
        tmp_path,
        f"model: {{source: {checkpoint('bert')}}}\n{FAST}"
        "variants: [{name: trt16, target: tensorrt, precision: fp16}]\n",
    )
    code, output = invoke("build", str(only), "--artifacts", str(artifacts), "--skip-unavailable")
    assert code == 1 and "none of the recipe's variants can be built on this machine" in output
