"""The runner for a variant's target: what verification and timing call, whatever the target."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.recipe import GPU_TARGETS  # re-exported: stage keys of these include the GPU
from pipeline.stages.export import MODEL_FILE, onnx_size

__all__ = ["GPU_TARGETS", "model_size", "runner_for"]


def runner_for(
    target: str,
    folder: Path,
    threads: int,
    optimization: str,
    name: str,
    precision: str = "fp32",
    shapes: Sequence[tuple[int, int]] = (),
) -> Any:
    """A runner (``prepare``/``call``/``run``) for the model or engine in ``folder``.

    ``precision`` is the variant's: OpenVINO computes at it (a bf16 variant's graph is FP32).
    ``shapes`` (batch, sequence): an ``ort-openvino`` variant with ``static_shapes`` is compiled
    for each of them, and inputs are padded up to one (pipeline.backends.static_shapes).
    """
    if shapes and target != "ort-openvino":
        raise ValueError(f"static shapes are an ort-openvino setting, not {target}'s")
    if target == "tensorrt":
        from pipeline.backends.tensorrt_backend import TensorRTRunner

        return TensorRTRunner(folder, name=name)
    from pipeline.backends.onnxruntime_backend import OrtRunner

    if target == "ort-cuda":
        return OrtRunner(folder / MODEL_FILE, threads, optimization, name=name, device="cuda")
    if target == "ort-openvino":

        def openvino(fixed: dict[str, tuple[int, int]] | None = None) -> OrtRunner:
            return OrtRunner(
                folder / MODEL_FILE,
                threads,
                optimization,
                name=name,
                device="openvino",
                precision=precision,
                shapes=fixed,
            )

        if shapes:
            from pipeline.backends.static_shapes import StaticShapeRunner

            return StaticShapeRunner(folder / MODEL_FILE, shapes, openvino, name=name)
        return openvino()
    return OrtRunner(folder / MODEL_FILE, threads, optimization, name=name)


def model_size(target: str, folder: Path) -> int:
    """Bytes a deployment ships: the engine for TensorRT, the ONNX file and its weights else."""
    if target == "tensorrt":
        from pipeline.backends.tensorrt_backend import ENGINE_FILE

        return (folder / ENGINE_FILE).stat().st_size
    return onnx_size(folder / MODEL_FILE)
