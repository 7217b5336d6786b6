"""TensorRT: the logic that needs neither TensorRT nor a GPU, everywhere; engines where they can be.

Profile derivation, option translation per TensorRT version, the metadata check that refuses an
engine built for another TensorRT or GPU, target availability and the build's fast failure run on
every machine. Building and running an engine needs ``tensorrt``, torch with CUDA and an NVIDIA
GPU; those tests are skipped elsewhere with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.backends.tensorrt_backend import (
    EngineMetadata,
    Profile,
    builder_settings,
    check_compatible,
    derive_profile,
)
from pipeline.build import BuildOptions, build
from pipeline.errors import PreconditionError, TargetUnavailable
from pipeline.recipes import encoder_pipeline
from pipeline.stages.compile import timing_cache_path
from pipeline.targets import Gpu, availability, gpus, parse_smi, read_cuda_probe, visible

H200 = Gpu("NVIDIA H200", "9.0", "570.86", 143771)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
ENGINE_REASON = (
    "needs tensorrt, torch with CUDA and an NVIDIA GPU "
    f"(tensorrt {'present' if HAS_TENSORRT else 'missing'}, CUDA {'present' if _cuda() else 'missing'})"
)
needs_engine = pytest.mark.skipif(not (HAS_TENSORRT and _cuda() and gpus()), reason=ENGINE_REASON)


def test_the_profile_covers_every_shape_the_build_feeds() -> None:
    # Timed b1/b8 at s128, verification batches of 16, texts up to 256 tokens.
    profile = derive_profile([1, 8], [128], max_length=256, verify_batch=16)
    assert profile == Profile(min=(1, 1), opt=(8, 128), max=(16, 256))
    assert profile.admits(16, 256) and profile.admits(1, 1)
    assert not profile.admits(17, 8) and not profile.admits(1, 257)
    tuned = derive_profile([1, 8], [64, 128], max_length=128, verify_batch=8, optimum="b1s64")
    assert tuned.opt == (1, 64) and tuned.max == (8, 128)
    with pytest.raises(PreconditionError, match="outside the profile"):
        derive_profile([1, 8], [128], max_length=128, verify_batch=8, optimum="b32s128")


def test_options_are_translated_for_each_tensorrt_version() -> None:
    ten = builder_settings("10.13.3.9", optimization_level=5, workspace_mb=2048)
    assert ten == {
        "network_flags": ["STRONGLY_TYPED"],
        "builder_flags": [],
        "cleared_flags": ["TF32"],
        "optimization_level": 5,
        "workspace_bytes": 2048 * 2**20,
    }
    # TensorRT 11 is always strongly typed (the flag is deprecated) and has no FP16/INT8 flags.
    eleven = builder_settings("11.0.0", optimization_level=3, workspace_mb=None)
    assert eleven["network_flags"] == [] and eleven["builder_flags"] == []
    assert eleven["workspace_bytes"] is None
    with pytest.raises(TargetUnavailable, match=r"TensorRT 8\.6\.1 is not supported"):
        builder_settings("8.6.1", 3, None)


def _meta(**changes: object) -> EngineMetadata:
    fields: dict[str, object] = {
        "tensorrt_version": "10.13.3.9",
        "gpu_name": "NVIDIA H200",
        "compute_capability": "9.0",
        "precision": "fp16",
        "onnx_sha256": "0" * 64,
        "inputs": ["input_ids", "attention_mask"],
        "profile": Profile((1, 1), (8, 128), (8, 128)).as_dict(),
        "settings": builder_settings("10.13.3.9", 3, None),
    }
    fields.update(changes)
    return EngineMetadata.model_validate(fields)


def test_an_engine_for_another_tensorrt_or_gpu_is_refused(tmp_path: Path) -> None:
    check_compatible(_meta(), "10.13.3.9", H200)  # same version and device: accepted
    with pytest.raises(
        TargetUnavailable, match=r"built for TensorRT 10\.13\.3\.9, this machine has 11\.0\.0"
    ):
        check_compatible(_meta(), "11.0.0", H200)
    a100 = Gpu("NVIDIA A100-SXM4-80GB", "8.0", "570.86", 81920)
    with pytest.raises(
        TargetUnavailable,
        match=r"GPU NVIDIA H200 \(compute capability 9\.0\), this machine has NVIDIA A100",
    ):
        check_compatible(_meta(), "10.13.3.9", a100)
    # Metadata round-trips through its file; damaged or foreign metadata is a clear error.
    (tmp_path / "engine.json").write_text(_meta().model_dump_json())
    assert EngineMetadata.read(tmp_path) == _meta()
    (tmp_path / "engine.json").write_text('{"tensorrt_version": "10"}')
    with pytest.raises(PreconditionError, match="not tforge engine metadata"):
        EngineMetadata.read(tmp_path)


def test_nvidia_smi_output_is_parsed_and_the_timing_cache_is_per_version_and_gpu() -> None:
    text = "NVIDIA H200, 9.0, 570.86, 143771\nNVIDIA A100-SXM4-80GB, 8.0, 570.86, 81920\n\n"
    assert parse_smi(text) == [H200, Gpu("NVIDIA A100-SXM4-80GB", "8.0", "570.86", 81920, 1)]
    assert parse_smi("garbage") == []
    listed = parse_smi(
        "NVIDIA H200, 9.0, 570.86, 143771, 0, GPU-1a2b3c4d-0000\n"
        "NVIDIA A100-SXM4-80GB, 8.0, 570.86, 81920, 1, GPU-9f8e7d6c-1111\n"
    )
    h200, a100 = listed
    assert (h200.index, h200.uuid, a100.index) == (0, "GPU-1a2b3c4d-0000", 1)
    assert h200 == Gpu("NVIDIA H200", "9.0", "570.86", 143771, 0, "GPU-1a2b3c4d-0000")
    # CUDA_VISIBLE_DEVICES: indices or UUID prefixes, in the order given; CUDA stops at the
    # first entry it cannot match; empty hides every GPU.
    assert visible(listed, None) == listed
    assert visible(listed, "1") == [a100]
    assert visible(listed, "1,0") == [a100, h200]
    assert visible(listed, "GPU-9f8e") == [a100]
    assert visible(listed, "0,7,1") == [h200]
    assert visible(listed, "") == [] and visible(listed, "-1") == []
    assert visible(listed, "GPU-") == []  # a prefix matching both is no match
    assert visible(listed, "0,0") == []  # a repeated GPU: CUDA sees none
    assert visible(listed, "MIG-GPU-9f8e7d6c-1111/1/0") == [a100]  # a MIG instance's GPU
    # A MIG instance named by its own UUID cannot be traced to its GPU here: all are kept.
    assert visible(listed, "MIG-3d2c1b0a-2222") == listed


def test_gpus_are_read_from_nvidia_smi_as_cuda_sees_them(tmp_path: Path) -> None:
    """A real nvidia-smi stand-in on PATH (a script printing its CSV) and a fresh interpreter
    per CUDA_VISIBLE_DEVICES setting: what the manifest's hardware would record."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        "printf 'NVIDIA H200, 9.0, 570.86, 143771, 0, GPU-1a2b3c4d-0000\\n"
        "NVIDIA A100-SXM4-80GB, 8.0, 570.86, 81920, 1, GPU-9f8e7d6c-1111\\n'\n"
    )
    smi.chmod(0o755)
    program = (
        "import json; from pipeline.environment import hardware; "
        "print(json.dumps([g['name'] for g in hardware()['gpus']]))"
    )

    def names(setting: str | None) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        env["PATH"] = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
        if setting is not None:
            env["CUDA_VISIBLE_DEVICES"] = setting
        ran = subprocess.run(
            [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
        )
        return list(json.loads(ran.stdout))

    assert names(None) == ["NVIDIA H200", "NVIDIA A100-SXM4-80GB"]
    assert names("1") == ["NVIDIA A100-SXM4-80GB"]
    assert names("GPU-9f8e") == ["NVIDIA A100-SXM4-80GB"]
    assert names("") == []
    path = timing_cache_path(Path("artifacts"), "10.13.3.9", "NVIDIA H200 NVL")
    assert path == Path("artifacts/tensorrt/10.13.3.9-NVIDIA-H200-NVL.timing")


def test_tensorrt_variants_compile_their_graph_and_keys_include_the_gpu(
    recipe_for, checkpoint
) -> None:
    recipe = recipe_for(
        checkpoint("bert"),
        data={
            "calibration": str(
                Path(__file__).resolve().parents[2] / "calibration" / "calibration.jsonl"
            )
        },
        variants=[
            {
                "name": "trt16",
                "target": "tensorrt",
                "precision": "fp16",
                "compile": {"optimization_level": 5},
            },
            {
                "name": "trt8",
                "target": "tensorrt",
                "precision": "int8",
                "quantize": {"method": "static", "calibration": {"samples": 32}},
            },
        ],
    )
    plan = encoder_pipeline(recipe, threads=1)
    steps = {s.id: s for s in plan.steps}
    assert steps["compile[trt16]"].inputs == {"model": "fp16[trt16].model"}
    assert steps["compile[trt8]"].inputs == {"model": "quantize[trt8].model"}
    assert plan.variant_models == {"trt16": "compile[trt16].engine", "trt8": "compile[trt8].engine"}
    assert steps["verify[trt16]"].inputs["model"] == "compile[trt16].engine"
    # The graph TensorRT is given is verified on ONNX Runtime CPU as well.
    graph = steps["verify[trt16:onnx]"]
    assert graph.inputs["model"] == "fp16[trt16].model"
    assert graph.stage.config.target == "ort-cpu"  # type: ignore[attr-defined]
    assert "gpu" not in graph.stage.key_facets()
    # TensorRT takes standard ops and symmetric (signed) activations.
    assert steps["optimize[trt16]"].stage.config.profile == "standard"  # type: ignore[attr-defined]
    assert steps["calibrate[trt8]"].stage.config.symmetric is True  # type: ignore[attr-defined]
    compile_cfg = steps["compile[trt16]"].stage.config
    assert compile_cfg.profile == {"min": [1, 1], "opt": [2, 16], "max": [8, 32]}  # type: ignore[attr-defined]
    assert compile_cfg.optimization_level == 5  # type: ignore[attr-defined]
    for step in ("compile[trt16]", "verify[trt16]", "latency"):
        assert "gpu" in steps[step].stage.key_facets()
    cpu = encoder_pipeline(recipe_for(checkpoint("bert")), threads=1)
    assert all("gpu" not in s.stage.key_facets() for s in cpu.steps)


@pytest.mark.skipif(availability("tensorrt").available, reason="this machine can use TensorRT")
def test_a_missing_target_fails_before_any_stage(recipe_for, checkpoint, tmp_path: Path) -> None:
    recipe = recipe_for(
        checkpoint("bert"), variants=[{"name": "trt", "target": "tensorrt", "precision": "fp16"}]
    )
    with pytest.raises(
        TargetUnavailable, match="target tensorrt is not available on this machine: "
    ) as error:
        build(recipe, BuildOptions(artifacts=tmp_path))
    assert "tensorrt" in str(error.value) and "tforge doctor" in str(error.value)
    assert not list(tmp_path.glob("cache/*/*"))  # nothing ran


@pytest.mark.skipif(availability("ort-cuda").available, reason="this machine has ORT CUDA")
def test_ort_cuda_needs_onnxruntime_gpu_and_a_gpu(recipe_for, checkpoint, tmp_path: Path) -> None:
    found = availability("ort-cuda")
    assert not found.available and (
        "onnxruntime-gpu" in found.detail or "no NVIDIA GPU" in found.detail
    )
    recipe = recipe_for(
        checkpoint("bert"), variants=[{"name": "cuda", "target": "ort-cuda", "precision": "fp16"}]
    )
    with pytest.raises(TargetUnavailable, match="target ort-cuda is not available"):
        build(recipe, BuildOptions(artifacts=tmp_path))


def test_the_cuda_provider_probe_names_the_missing_library() -> None:
    assert read_cuda_probe(0, '["CUDAExecutionProvider", "CPUExecutionProvider"]\n', "") is None
    # What ONNX Runtime prints when the provider library cannot load its CUDA dependencies.
    stderr = (
        "\x1b[1;31m2026-12-07 [E:onnxruntime:Default, provider_bridge_ort.cc:2195 "
        "TryGetProviderInfo_CUDA] [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
        "libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared "
        "object file: No such file or directory\x1b[m\n"
        "2026-12-07 [W:onnxruntime:Default] Failed to create CUDAExecutionProvider. "
        "Require cuDNN 9.* and CUDA 13.*\n"
    )
    found = read_cuda_probe(0, '["CPUExecutionProvider"]\n', stderr)
    assert found is not None and "libcublasLt.so.13 not found" in found
    assert "libonnxruntime_providers_cuda" not in found
    fallback = read_cuda_probe(0, '["CPUExecutionProvider"]', "\x1b[0;93mno device\x1b[m\n")
    assert fallback == (
        "ONNX Runtime's CUDA provider does not start: its session ran on "
        "CPUExecutionProvider instead (no device)"
    )
    crashed = read_cuda_probe(-11, "", "")
    assert crashed == "ONNX Runtime's CUDA provider does not start: exit status -11"


ORT_CUDA = availability("ort-cuda")


def _build_beside_fp32(recipe_for, checkpoint, artifacts: Path, *variants: dict, **sections):  # type: ignore[no-untyped-def]
    """A tiny BERT built with a CPU FP32 variant and ``variants``."""
    recipe = recipe_for(
        checkpoint("bert"),
        variants=[{"name": "fp32", "precision": "fp32"}, *variants],
        **sections,
    )
    return build(recipe, BuildOptions(artifacts=artifacts))


@pytest.mark.gpu
@pytest.mark.skipif(not ORT_CUDA.available, reason=f"needs ORT CUDA: {ORT_CUDA.detail}")
def test_ort_cuda_fp32_and_fp16_build_verify_time_and_probe_on_the_gpu(
    recipe_for, checkpoint, tmp_path: Path
) -> None:
    outcome = _build_beside_fp32(
        recipe_for,
        checkpoint,
        tmp_path,
        {"name": "cuda32", "target": "ort-cuda", "precision": "fp32"},
        {"name": "cuda16", "target": "ort-cuda", "precision": "fp16"},
        latency={"memory": True},
    )
    verify = {v: outcome.manifest.stage(f"verify[{v}]").stats for v in ("cuda32", "cuda16")}  # type: ignore[union-attr]
    # Float32 on the GPU (TF32 off) is the CPU's float32 up to summation order.
    assert verify["cuda32"]["max_abs_error"] < 1e-4
    assert verify["cuda16"]["nonfinite_outputs"] == 0
    assert verify["cuda16"]["mean_cosine"] > 0.999 and verify["cuda16"]["max_abs_error"] > 1e-4
    floor = outcome.manifest.stage("floor").stats  # type: ignore[union-attr]
    assert {entry["device"] for entry in floor.values()} == {"cuda"}
    latency = outcome.manifest.stage("latency").stats  # type: ignore[union-attr]
    assert latency["pytorch_device"] == "cuda"
    assert set(latency["device_bytes"]) == {"pytorch", "cuda32", "cuda16"}
    assert latency["device_bytes"]["cuda16"] > 0
    assert "fp32" not in latency["device_bytes"]  # the CPU variant is probed on the CPU


@pytest.mark.gpu
@needs_engine
def test_a_tensorrt_fp16_engine_builds_runs_and_matches_pytorch(
    recipe_for, checkpoint, tmp_path: Path
) -> None:
    outcome = _build_beside_fp32(
        recipe_for,
        checkpoint,
        tmp_path,
        {"name": "trt16", "target": "tensorrt", "precision": "fp16"},
    )
    compiled = outcome.manifest.stage("compile[trt16]")
    assert compiled is not None and compiled.stats["engine_bytes"] > 0
    figures = outcome.manifest.stage("verify[trt16]").stats  # type: ignore[union-attr]
    assert figures["nonfinite_outputs"] == 0 and figures["mean_cosine"] > 0.999
    engine = outcome.run_dir / "models" / "trt16"
    meta = EngineMetadata.read(engine)
    assert meta.gpu_name == gpus()[0].name and meta.precision == "fp16"
    # A second build reuses the timing cache written by the first.
    assert timing_cache_path(tmp_path, meta.tensorrt_version, meta.gpu_name).is_file()

    from pipeline.backends.tensorrt_backend import TensorRTRunner

    runner = TensorRTRunner(engine)
    feed = {
        "input_ids": np.ones((2, 16), dtype=np.int64),
        "attention_mask": np.ones((2, 16), dtype=np.int64),
        "token_type_ids": np.zeros((2, 16), dtype=np.int64),
    }
    out = runner.run({k: v for k, v in feed.items() if k in runner.input_names})
    assert all(np.isfinite(v).all() for v in out.values())
