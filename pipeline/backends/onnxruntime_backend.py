"""ONNX Runtime on the CPU, on the CPU through OpenVINO's provider, or on a CUDA GPU: sessions
configured the same way for verification and timing.

On CUDA, inputs and outputs are bound to device memory (IOBinding) once per feed, so a timed
call is the model's run on the GPU and a synchronisation, not host-device copies. OpenVINO's
provider is set up in pipeline.backends.openvino_backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def require_inputs(path: Path, names: Sequence[str], feed: Mapping[str, Any]) -> None:
    """A feed without one of the model's inputs is refused, naming both sides."""
    missing = [n for n in names if n not in feed]
    if missing:
        raise KeyError(f"{path.name} needs inputs {missing}; the feed has {sorted(feed)}")


@dataclass(frozen=True)
class Bound:
    """A feed bound to a session: the binding, and the host arrays it reads (kept alive)."""

    binding: Any
    arrays: dict[str, np.ndarray]


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
            # ORT's CUDA provider multiplies float32 matrices in TF32 (10-bit mantissa) unless
            # told not to; a float32 graph is then no longer computed in float32. PyTorch, the
            # reference, keeps float32 matmuls in float32 by default, so this does too.
            options_cuda = {"device_id": "0", "use_tf32": "0"}
            # ONNX Runtime's documented way to share PyTorch's CUDA and cuDNN libraries: import
            # torch first. Where CUDA is installed only inside torch's own packages, the CUDA
            # provider finds its libraries this way and nowhere else.
            import torch  # noqa: F401

            providers = [("CUDAExecutionProvider", options_cuda), "CPUExecutionProvider"]
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

    def _arrays(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_inputs(self.path, self.input_names, feed)
        return {name: np.ascontiguousarray(feed[name]) for name in self.input_names}

    def prepare(self, feed: dict[str, np.ndarray]) -> Bound:
        """The feed bound to the session (IOBinding), for repeated calls.

        Inputs are bound where they are (host memory on the CPU targets, copied to the device
        once on CUDA) and the outputs to the session's device, so a call is the model's run and
        the allocation of its outputs, not numpy conversions: ``session.run`` spends 0.9 ms of
        OpenVINO's 4.9 ms (MiniLM ov-int8, b1s128) and 0.4 of the CPU provider's 10.4 (int8) on
        them.
        """
        arrays = self._arrays(feed)
        binding = self.session.io_binding()
        if self.device == "cuda":
            import onnxruntime as ort

            for name, array in arrays.items():
                binding.bind_ortvalue_input(
                    name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
                )
        else:
            for name, array in arrays.items():
                binding.bind_cpu_input(name, array)
        device = "cuda" if self.device == "cuda" else "cpu"
        for name in self.output_names:
            binding.bind_output(name, device, 0)
        return Bound(binding, arrays)

    def call(self, prepared: Bound) -> Any:
        """One run of the bound feed; returns the binding, whose outputs :meth:`fetch` reads."""
        self.session.run_with_iobinding(prepared.binding)
        if self.device == "cuda":
            prepared.binding.synchronize_outputs()
        return prepared.binding

    def fetch(self, result: Any) -> list[np.ndarray]:
        """The outputs of a :meth:`call`, in host memory, in ``output_names`` order."""
        return [np.asarray(value) for value in result.copy_outputs_to_cpu()]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device == "cuda":
            outputs = self.fetch(self.call(self.prepare(feed)))
        else:
            # One call: binding it first would only add work.
            outputs = self.session.run(None, self._arrays(feed))
        # Float outputs as float32, except float16 ones (a decoder's float16 KV cache), which
        # go back into the next step's float16 inputs as they are: no copy either way.
        return {
            name: value if value.dtype == np.float16 else np.asarray(value, dtype=np.float32)
            for name, value in zip(self.output_names, outputs, strict=True)
        }
