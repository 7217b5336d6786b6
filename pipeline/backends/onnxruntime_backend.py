"""ONNX Runtime on the CPU, on the CPU through OpenVINO's provider, or on a CUDA GPU: sessions
configured the same way for verification and timing.

On CUDA, inputs and outputs are bound to device memory (IOBinding) once per feed, so a timed
call is the model's run on the GPU and a synchronisation, not host-device copies. OpenVINO's
provider is set up in pipeline.backends.openvino_backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import TargetUnavailable, TforgeError, first_line

#: ORT's own graph optimisation levels, by the recipe's names.
OPTIMIZATION_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def session_options(threads: int, optimization: str = "all") -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization]
    )
    # ORT's worker threads otherwise spin for milliseconds after each run and steal the core
    # from whatever runs next (PyTorch, in an interleaved timing): its numbers read up to 2x slow.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


class OrtRunner:
    """An ONNX Runtime session over one model file: on the CPU, on the CPU through OpenVINO's
    provider (``device="openvino"``, computing at ``precision``, compiled for the fixed input
    ``shapes`` when given), or on a GPU (``"cuda"``)."""

    def __init__(
        self,
        path: Path,
        threads: int,
        optimization: str = "all",
        name: str = "onnxruntime",
        device: Literal["cpu", "openvino", "cuda"] = "cpu",
        precision: str = "fp32",
        shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        import onnxruntime as ort

        if shapes and device != "openvino":
            raise ValueError(f"fixed input shapes are an OpenVINO setting, not {device}'s")

        self.name = name
        self.path = path
        self.device = device
        options = session_options(threads, optimization)
        providers: list[Any] | None = ["CPUExecutionProvider"]
        if device == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        elif device == "openvino":
            from pipeline.backends.openvino_backend import add_provider

            add_provider(options, precision, threads, shapes)
            providers = None  # the session takes the provider from its options
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=options, providers=providers
            )
        # onnxruntime's load errors are pybind11 exception types (Fail, InvalidGraph,
        # NotImplemented...) with no common public base but Exception.
        except Exception as error:
            if device == "openvino" and "fallback to CPU EP" in str(error):
                raise TforgeError(
                    f"OpenVINO's provider does not take every node of {path} (the rest would "
                    "run on ONNX Runtime's own CPU kernels)",
                    "build this variant for target ort-cpu, or check its ops with tforge inspect",
                ) from error
            raise TforgeError(
                f"ONNX Runtime {ort.__version__} cannot load {path}: {first_line(error)}",
                "check the opset and operators against this onnxruntime (tforge inspect shows them)",
            ) from error
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ORT falls back to the CPU silently when the CUDA provider cannot start.
            raise TargetUnavailable(
                f"ONNX Runtime could not start its CUDA provider for {path.name} "
                f"(session providers: {', '.join(self.session.get_providers())})",
                "check the CUDA and cuDNN libraries onnxruntime-gpu needs (tforge doctor)",
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def prepare(self, feed: dict[str, np.ndarray]) -> Any:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise KeyError(f"{self.path.name} needs inputs {missing}; the feed has {sorted(feed)}")
        arrays = {name: np.ascontiguousarray(feed[name]) for name in self.input_names}
        if self.device != "cuda":
            return arrays
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, array in arrays.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)
        return binding

    def call(self, prepared: Any) -> Any:
        if self.device != "cuda":
            return self.session.run(None, prepared)
        self.session.run_with_iobinding(prepared)
        prepared.synchronize_outputs()
        return prepared

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.call(self.prepare(feed))
        if self.device == "cuda":
            outputs = outputs.copy_outputs_to_cpu()
        return {
            name: np.asarray(value, dtype=np.float32)
            for name, value in zip(self.output_names, outputs, strict=True)
        }
