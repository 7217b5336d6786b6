"""Target ort-openvino: ONNX Runtime with OpenVINO's execution provider, on the CPU.

The option translation, capability parsing and refusals are tested everywhere; the sessions,
builds and budget search run where the provider is installed (``tforge[openvino]``, x86-64)
and are skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.artifacts import Artifact
from pipeline.backends.onnxruntime_backend import OrtRunner
from pipeline.backends.openvino_backend import (
    OpenVinoDevice,
    cpu_device,
    inference_precision,
    parse_capabilities,
    provider_options,
    require_bf16,
)
from pipeline.build import BuildOptions, build
from pipeline.errors import TargetUnavailable, TforgeError
from pipeline.stages.base import BuildContext
from pipeline.stages.export import MODEL_FILE
from pipeline.stages.verify import VerifyConfig, VerifyStage
from pipeline.targets import availability

OPENVINO = availability("ort-openvino")
needs_openvino = pytest.mark.skipif(
    not OPENVINO.available, reason=f"needs OpenVINO's provider: {OPENVINO.detail}"
)


def _native_bf16() -> bool:
    return cpu_device().native_bf16


def _verified(target: str, precision: str, model: Path, reference: Artifact, out: Path) -> dict:  # type: ignore[type-arg]
    """The verify stage's figures for ``model`` run on ``target`` at ``precision``."""
    config = VerifyConfig(
        variant="v", target=target, precision=precision, session_optimization="basic", threads=1
    )
    out.mkdir()
    inputs = {"model": Artifact.of("model", model), "reference": reference}
    return VerifyStage(config).run(BuildContext(), inputs, out).stats


def test_variant_precisions_become_openvino_inference_precisions() -> None:
    assert inference_precision("fp32", native_bf16=True) == "f32"
    assert inference_precision("bf16", native_bf16=True) == "bf16"
    # INT8's float remainder: bf16 where the CPU has it, else f32 (OpenVINO's own default).
    assert inference_precision("int8", native_bf16=True) == "bf16"
    assert inference_precision("int8", native_bf16=False) == "f32"
    with pytest.raises(ValueError, match="fp32, bf16 or int8"):
        inference_precision("fp16", native_bf16=True)


def test_provider_options_are_openvino_properties_for_the_cpu() -> None:
    options = provider_options("bf16", threads=2, native_bf16=True)
    assert set(options) == {"load_config"}
    assert json.loads(options["load_config"]) == {
        "CPU": {
            "INFERENCE_NUM_THREADS": "2",
            "INFERENCE_PRECISION_HINT": "bf16",
            "NUM_STREAMS": "1",
            "PERFORMANCE_HINT": "LATENCY",
        }
    }
    # The same settings give the same bytes (the session is configured reproducibly).
    assert options == provider_options("bf16", threads=2, native_bf16=True)


def test_capabilities_parse_and_bf16_needs_them() -> None:
    assert parse_capabilities("BF16 WINOGRAD FP32 FP16 INT8 BIN EXPORT_IMPORT") == (
        "BF16",
        "BIN",
        "EXPORT_IMPORT",
        "FP16",
        "FP32",
        "INT8",
        "WINOGRAD",
    )
    without = OpenVinoDevice(None, "1.8.1", "Old CPU", parse_capabilities("FP32 INT8 BIN"))
    assert not without.native_bf16
    with pytest.raises(TargetUnavailable, match="bf16 needs a CPU with AMX or AVX512-BF16") as e:
        require_bf16(without)
    assert "Old CPU" in str(e.value) and "fp32 or int8" in str(e.value)
    require_bf16(OpenVinoDevice(None, "1.8.1", "New CPU", ("BF16", "FP32")))


def test_the_plan_runs_openvino_variants_as_their_target(recipe_for, checkpoint) -> None:
    from pipeline.recipes import encoder_pipeline

    recipe = recipe_for(
        checkpoint("bert"),
        variants=[
            {"name": "cpu", "precision": "int8"},
            {"name": "ov16", "target": "ort-openvino", "precision": "bf16"},
            {
                "name": "ov8",
                "target": "ort-openvino",
                "precision": "int8",
                "quantize": {"method": "static", "budget": {"min_mean_cosine": 0.9}},
            },
            {
                "name": "ov8-ort",
                "target": "ort-openvino",
                "precision": "int8",
                "quantize": {"method": "static", "quantizer": "onnxruntime"},
            },
        ],
    )
    steps = {s.id: s for s in encoder_pipeline(recipe, threads=1).steps}
    # OpenVINO takes ORT's fused Attention and BiasGelu; INT8 keeps Q/K/V as MatMuls.
    assert steps["optimize[ov16]"].stage.config.fusions == ("attention", "ffn")  # type: ignore[attr-defined]
    assert steps["optimize[ov8]"].stage.config.fusions == ("ffn", "mha")  # type: ignore[attr-defined]
    assert not steps["optimize[ov8]"].stage.config.residual_sum  # type: ignore[attr-defined]
    # NNCF quantizes OpenVINO's INT8 by default and measures its own ranges on the drawn texts.
    quantize = steps["quantize[ov8]"]
    assert quantize.stage.config.quantizer == "nncf"  # type: ignore[attr-defined]
    assert quantize.stage.config.draw == {  # type: ignore[attr-defined]
        "samples": 512,
        "seed": 0,
        "batch_size": 8,
        "max_length": 32,
        "text_field": "text",
    }
    assert quantize.inputs["calibration"] == "input:calibration" and "calibrate[ov8]" not in steps
    # ONNX Runtime's quantizer on this target takes symmetric ranges from a calibrate stage.
    assert steps["calibrate[ov8-ort]"].stage.config.symmetric is True  # type: ignore[attr-defined]
    assert "quantizer" not in steps["quantize[ov8-ort]"].stage.key_config()
    # The budget's candidates are measured on the variant's own target.
    assert quantize.stage.config.target == "ort-openvino"  # type: ignore[attr-defined]
    assert "target" not in steps["quantize[cpu]"].stage.key_config()
    assert steps["verify[ov16]"].stage.config.precision == "bf16"  # type: ignore[attr-defined]
    latency = steps["latency"].stage.config
    assert latency.targets == {  # type: ignore[attr-defined]
        "ov16": "ort-openvino",
        "ov8": "ort-openvino",
        "ov8-ort": "ort-openvino",
    }
    assert latency.precisions == {"ov16": "bf16", "ov8": "int8", "ov8-ort": "int8"}  # type: ignore[attr-defined]
    # A CPU-only build keeps its latency key (no empty targets or precisions in it).
    cpu_only = encoder_pipeline(recipe_for(checkpoint("bert")), threads=1)
    key = next(s for s in cpu_only.steps if s.id == "latency").stage.key_config()
    assert "targets" not in key and "precisions" not in key


@needs_openvino
def test_fp32_on_openvino_is_the_same_math_and_bf16_is_close(
    fused_bert, bert_parts, tmp_path
) -> None:
    model = fused_bert / MODEL_FILE
    feed = {
        "input_ids": np.array([[2, 40, 41, 42, 3, 0], [2, 50, 3, 0, 0, 0]], dtype=np.int64),
        "attention_mask": np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=np.int64),
        "token_type_ids": np.zeros((2, 6), dtype=np.int64),
    }
    cpu = OrtRunner(model, 1, "basic").run(feed)["last_hidden_state"]
    fp32 = OrtRunner(model, 1, "basic", device="openvino", precision="fp32")
    assert fp32.session.get_providers()[0] == "OpenVINOExecutionProvider"
    out = fp32.run(feed)["last_hidden_state"]
    real = feed["attention_mask"].astype(bool)
    fp32_error = np.abs(out - cpu)[real].max()
    assert fp32_error < 1e-4
    reference = bert_parts["reference"]
    figures = _verified("ort-openvino", "fp32", fused_bert, reference, tmp_path / "v32")
    assert figures["max_abs_error"] < 1e-4 and figures["mean_cosine"] > 0.99999
    if _native_bf16():
        bf16 = OrtRunner(model, 1, "basic", device="openvino", precision="bf16").run(feed)
        error = np.abs(bf16["last_hidden_state"] - cpu)[real].max()
        # bfloat16 really ran (an error far above FP32's; OpenVINO keeps some of this tiny
        # model's narrow products in f32: 2.7e-4 here, 2e-2 on MiniLM), and it stays close.
        assert 20 * fp32_error < error < 0.25
        figures = _verified("ort-openvino", "bf16", fused_bert, reference, tmp_path / "v16")
        assert figures["mean_cosine"] > 0.999 and figures["agreement"] >= 0.95


@needs_openvino
def test_a_node_openvino_does_not_take_is_refused_not_run_elsewhere(tmp_path: Path) -> None:
    # Det: ONNX Runtime's CPU provider has it, OpenVINO does not; a partial placement would
    # time ONNX Runtime's kernels under OpenVINO's name.
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 3])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [])
    graph = helper.make_graph([helper.make_node("Det", ["X"], ["Y"])], "det", [x], [y])
    path = tmp_path / MODEL_FILE
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    assert OrtRunner(path, 1).run({"X": np.eye(3, dtype=np.float32) * 2})["Y"] == pytest.approx(8)
    with pytest.raises(TforgeError, match="OpenVINO's provider does not take every node") as e:
        OrtRunner(path, 1, device="openvino")
    assert "target ort-cpu" in str(e.value)


@needs_openvino
def test_openvino_variants_build_verify_and_time(checkpoint, recipe_for, tmp_path) -> None:
    variants = [
        {"name": "ov32", "target": "ort-openvino", "precision": "fp32"},
        {
            "name": "ov8",
            "target": "ort-openvino",
            "precision": "int8",
            "quantize": {"method": "static", "calibration": {"samples": 16}},
        },
    ]
    if _native_bf16():
        variants.append({"name": "ov16", "target": "ort-openvino", "precision": "bf16"})
    recipe = recipe_for(checkpoint("bert"), variants=variants, latency={"memory": True})
    outcome = build(recipe, BuildOptions(artifacts=tmp_path))
    assert outcome.passed, [str(c) for c in outcome.manifest.checks if not c.passed]
    stages = {s.step: s for s in outcome.manifest.stages}
    assert stages["verify[ov32]"].stats["max_abs_error"] < 1e-4
    assert stages["quantize[ov8]"].stats["quantized_matmuls"] == 12
    latency = stages["latency"].stats
    for name in [v["name"] for v in variants]:
        assert latency["contenders"][name]["b2s16"]["p50_ms"] > 0
        # Host memory of a fresh process that ran the variant on OpenVINO.
        assert latency["peak_rss_bytes"][name] > 10 * 2**20
    assert "onnxruntime-ep-openvino" in outcome.manifest.environment["versions"]
    markdown = (outcome.run_dir / "report.md").read_text()
    assert "ov8 (int8, ort-openvino)" in markdown


@needs_openvino
def test_the_budget_on_openvino_keeps_a_sensitive_node_in_float(
    fused_bert, bert_parts, tmp_path
) -> None:
    from pipeline.calibration.table import CalibrationTable
    from pipeline.stages.calibrate import TABLE
    from tests.stages.test_calibrate import calibrate
    from tests.stages.test_quantize import _quantize, _with_sensitive_node

    fragile = _with_sensitive_node(fused_bert, tmp_path / "fragile")
    parts = {**bert_parts, "model": Artifact.of("model", tmp_path / "fragile")}
    table_folder, _ = calibrate(parts, tmp_path / "c", symmetric=True)
    assert CalibrationTable.read(table_folder / TABLE).symmetric

    folder, result = _quantize(
        tmp_path / "fragile",
        tmp_path / "budget",
        bert_parts["reference"],
        method="static",
        calibration=Artifact.of("calibration", table_folder),
        budget={"min_mean_cosine": 0.99999},
        target="ort-openvino",
        threads=1,
    )
    budget = result.stats["budget"]
    # Every node quantized misses the limit; the fragile node is the first kept in float.
    assert not budget["attempts"][0]["passed"]
    assert budget["met"] and budget["kept_float"] >= 1
    assert result.stats["kept_float"][0]["node"] == fragile
    nodes = {n.name: n.op_type for n in onnx.load(str(folder / MODEL_FILE)).graph.node}
    assert nodes[fragile] == "MatMul"


def test_a_missing_nncf_fails_before_any_stage(
    recipe_for, checkpoint, tmp_path, monkeypatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a)
    )
    recipe = recipe_for(
        checkpoint("bert"),
        variants=[
            {
                "name": "q",
                "precision": "int8",
                "quantize": {"method": "static", "quantizer": "nncf"},
            }
        ],
    )
    with pytest.raises(TargetUnavailable, match="needs NNCF") as error:
        build(recipe, BuildOptions(artifacts=tmp_path))
    assert "tforge[openvino]" in str(error.value)
    assert not list(tmp_path.glob("cache/*/*"))


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("onnxruntime_ep_openvino") is None,
    reason="needs the onnxruntime-ep-openvino plugin",
)
def test_asking_for_the_device_twice_gives_the_same_answer() -> None:
    """The plugin is registered once per process: a second look (a build's second OpenVINO
    variant) gives the first one's answer, the device or the same reason, never ONNX Runtime's
    "already registered" error."""
    answers = []
    for _ in range(2):
        try:
            answers.append(cpu_device().name)
        except TargetUnavailable as error:
            answers.append(error.message)
    assert answers[0] == answers[1] and "already registered" not in answers[1]


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("onnxruntime_ep_openvino") is None,
    reason="needs the onnxruntime-ep-openvino plugin",
)
def test_a_cpu_the_plugin_does_not_claim_is_named() -> None:
    """ONNX Runtime's OpenVINO plugin claims Intel devices only: on another vendor's CPU the
    target is refused naming the vendor, and on an Intel CPU the device is found."""
    import onnxruntime as ort

    cpu = next(
        d.device for d in ort.get_ep_devices() if d.device.type == ort.OrtHardwareDeviceType.CPU
    )
    if cpu.vendor_id == 0x8086:
        assert cpu_device().name
    else:
        with pytest.raises(TargetUnavailable, match=f"claims Intel devices only.*{cpu.vendor}"):
            cpu_device()
