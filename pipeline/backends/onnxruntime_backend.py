"""ONNX Runtime on the CPU: sessions configured the same way for verification and timing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TforgeError, first_line

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
    """An ONNX Runtime CPU session over one model file."""

    def __init__(
        self, path: Path, threads: int, optimization: str = "all", name: str = "onnxruntime"
    ) -> None:
        import onnxruntime as ort

        self.name = name
        self.path = path
        try:
            self.session = ort.InferenceSession(
                str(path),
                sess_options=session_options(threads, optimization),
                providers=["CPUExecutionProvider"],
            )
        # onnxruntime's load errors are pybind11 exception types (Fail, InvalidGraph,
        # NotImplemented...) with no common public base but Exception.
        except Exception as error:
            raise TforgeError(
                f"ONNX Runtime {ort.__version__} cannot load {path}: {first_line(error)}",
                "check the opset and operators against this onnxruntime (tforge inspect shows them)",
            ) from error
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def prepare(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise KeyError(f"{self.path.name} needs inputs {missing}; the feed has {sorted(feed)}")
        return {name: np.ascontiguousarray(feed[name]) for name in self.input_names}

    def call(self, prepared: dict[str, np.ndarray]) -> Any:
        return self.session.run(None, prepared)

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.call(self.prepare(feed))
        return {
            name: np.asarray(value, dtype=np.float32)
            for name, value in zip(self.output_names, outputs, strict=True)
        }
