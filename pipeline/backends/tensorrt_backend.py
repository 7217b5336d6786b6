"""TensorRT 10 and 11: engines built from our ONNX graphs, their metadata, and a runner.

Precision comes from the graph, never from builder flags: FP16 from the typed FP16 graph (the
``fp16`` stage on the ``standard`` profile), INT8 from the static Q/DQ graph. TensorRT 11 removed
the FP16/INT8 builder flags and calibrators and always builds strongly typed networks; on
TensorRT 10 the network is created with the ``STRONGLY_TYPED`` flag so both versions build the
same thing from the same graph.

The parts that need neither TensorRT nor a GPU are plain functions, tested everywhere:
:func:`derive_profile` (min/opt/max shapes from the recipe), :func:`builder_settings` (the
recipe's options translated for a TensorRT version) and :class:`EngineMetadata` with
:func:`check_compatible` (an engine is refused on another TensorRT version or GPU). The builder
and :class:`TensorRTRunner` use the public Python API (``tensorrt``) and torch CUDA tensors as
device buffers; they are imported lazily, so this module imports without TensorRT.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.errors import PreconditionError, TargetUnavailable
from pipeline.targets import Gpu

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.plan"
METADATA_FILE = "engine.json"
#: Version of the metadata written beside each engine.
METADATA_VERSION = 1
SUPPORTED_MAJORS = (10, 11)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: per input, the (batch, sequence) shape at min, opt and max."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    def admits(self, batch: int, sequence: int) -> bool:
        return self.min[0] <= batch <= self.max[0] and self.min[1] <= sequence <= self.max[1]


def derive_profile(
    batches: Sequence[int],
    sequences: Sequence[int],
    max_length: int,
    verify_batch: int,
    optimum: str | None = None,
) -> Profile:
    """The profile every shape the build feeds must fit, tuned for the optimum.

    Min: batch 1 and one token (verification batches are padded only to their longest text).
    Max: the largest timed batch or verification batch, and the longest timed sequence or
    ``data.max_length``. Opt: ``optimum`` (``b8s128``) or the largest timed shape.
    """
    largest = (max(batches), max(sequences))
    high = (max(max(batches), verify_batch), max(max(sequences), max_length))
    opt = largest
    if optimum is not None:
        batch, _, sequence = optimum[1:].partition("s")
        opt = (int(batch), int(sequence))
    profile = Profile(min=(1, 1), opt=opt, max=high)
    if not profile.admits(*opt):
        raise PreconditionError(
            f"the optimum shape {optimum} lies outside the profile (batch 1-{high[0]}, "
            f"sequence 1-{high[1]})",
            "pick an optimum within the recipe's shapes",
        )
    return profile


def version_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise PreconditionError(f"cannot read the TensorRT version {version!r}") from None


def builder_settings(
    version: str, optimization_level: int, workspace_mb: int | None
) -> dict[str, Any]:
    """The recipe's options in the terms of this TensorRT version's builder API."""
    major = version_major(version)
    if major not in SUPPORTED_MAJORS:
        raise TargetUnavailable(
            f"TensorRT {version} is not supported (tforge builds with TensorRT 10 or 11)",
            "install tensorrt 10.x or 11.x",
        )
    return {
        # 10: strongly typed on request; 11: always (the flag is deprecated and ignored).
        "network_flags": ["STRONGLY_TYPED"] if major == 10 else [],
        "builder_flags": [],  # precision comes from the graph's types and Q/DQ nodes
        # TF32 (on by default) would multiply the graph's float32 tensors with a 10-bit
        # mantissa: a precision the graph does not state. Cleared where the version has it.
        "cleared_flags": ["TF32"],
        "optimization_level": optimization_level,
        "workspace_bytes": workspace_mb * 2**20 if workspace_mb else None,
    }


class EngineMetadata(BaseModel):
    """Written beside every engine: what it was built from, with what, for which device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metadata_version: int = METADATA_VERSION
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    onnx_sha256: str
    inputs: list[str]
    profile: dict[str, list[int]]
    settings: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> EngineMetadata:
        path = folder / METADATA_FILE
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise PreconditionError(
                f"{path} is missing or not tforge engine metadata ({error})",
                "rebuild the engine with tforge build",
            ) from None


def check_compatible(meta: EngineMetadata, tensorrt_version: str, gpu: Gpu) -> None:
    """Refuse an engine built for another TensorRT version or GPU (TensorRT engines are
    specific to both; loading one elsewhere fails deep inside the runtime, or runs wrongly)."""
    problems = []
    if meta.tensorrt_version != tensorrt_version:
        problems.append(f"TensorRT {meta.tensorrt_version}, this machine has {tensorrt_version}")
    if meta.compute_capability != gpu.compute_capability or meta.gpu_name != gpu.name:
        problems.append(
            f"GPU {meta.gpu_name} (compute capability {meta.compute_capability}), this machine "
            f"has {gpu.name} ({gpu.compute_capability})"
        )
    if problems:
        raise TargetUnavailable(
            "the TensorRT engine was built for " + "; ".join(problems),
            "rebuild it here: tforge build RECIPE (the cache key includes the TensorRT version and GPU)",
        )


class _Logger:
    """TensorRT's log routed to ours (created lazily: the base class lives in tensorrt)."""

    @staticmethod
    def make() -> Any:
        import tensorrt as trt

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    log.error("tensorrt: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    log.warning("tensorrt: %s", msg)
                else:
                    log.debug("tensorrt: %s", msg)

        return Logger()


def build_engine(
    onnx_path: Path,
    profile: Profile,
    settings: dict[str, Any],
    timing_cache: bytes | None,
) -> tuple[bytes, bytes | None, list[str]]:
    """Parse ``onnx_path`` and build a serialized engine.

    Returns the engine, the updated timing cache (when one was given) and the input names.
    """
    import tensorrt as trt

    logger = _Logger.make()
    builder = trt.Builder(logger)
    flags = 0
    for name in settings["network_flags"]:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files beside the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise PreconditionError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {'; '.join(errors[:3])}",
            "build this variant with optimize: standard (no ONNX Runtime contrib ops)",
        )
    config = builder.create_builder_config()
    config.builder_optimization_level = settings["optimization_level"]
    if settings["workspace_bytes"]:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_bytes"])
    for flag in settings["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in settings.get("cleared_flags", []):
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache)
        config.set_timing_cache(cache, ignore_mismatch=False)
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    optimization = builder.create_optimization_profile()
    for name in inputs:
        optimization.set_shape(name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PreconditionError(
            f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name}",
            "run with -v for TensorRT's log; a larger compile.workspace_mb may help",
        )
    updated = bytes(config.get_timing_cache().serialize()) if cache is not None else None
    return bytes(serialized), updated, inputs


class TensorRTRunner:
    """Runs an engine on the GPU: inputs copied in, outputs copied back, one CUDA stream.

    Device buffers are torch CUDA tensors (no extra CUDA binding needed); ``call`` leaves
    everything on the device and synchronises, so timing measures the engine, not the copies.
    """

    def __init__(self, folder: Path, name: str = "tensorrt") -> None:
        import tensorrt as trt
        import torch

        from pipeline.targets import gpus

        self.name = name
        self.meta = EngineMetadata.read(folder)
        devices = gpus()
        if not devices:
            raise TargetUnavailable("no NVIDIA GPU is visible to run the TensorRT engine")
        check_compatible(self.meta, trt.__version__, devices[0])
        self.runtime = trt.Runtime(_Logger.make())
        self.engine = self.runtime.deserialize_cuda_engine((folder / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise PreconditionError(f"TensorRT could not load {folder / ENGINE_FILE}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._bound: dict[str, Any] | None = None
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [
            n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]
        self.output_names = [n for n in names if n not in self.input_names]
        self._torch_dtype = {
            n: _torch_dtype(self.engine.get_tensor_dtype(n), torch, trt) for n in names
        }
        self.profile = Profile(
            min=tuple(self.meta.profile["min"]),  # type: ignore[arg-type]
            opt=tuple(self.meta.profile["opt"]),  # type: ignore[arg-type]
            max=tuple(self.meta.profile["max"]),  # type: ignore[arg-type]
        )

    def prepare(self, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        """Inputs on the device with their shapes set, outputs allocated: ready to run."""
        import torch

        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise KeyError(f"the engine needs inputs {missing}; the feed has {sorted(feed)}")
        batch, sequence = feed[self.input_names[0]].shape[:2]
        if not self.profile.admits(batch, sequence):
            raise PreconditionError(
                f"shape b{batch}s{sequence} is outside the engine's profile {self.meta.profile}",
                "widen the recipe's shapes or data.max_length and rebuild",
            )
        buffers: dict[str, Any] = {}
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feed[name]))
            buffers[name] = tensor.to("cuda", dtype=self._torch_dtype[name])
        self._set_shapes(buffers)
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=self._torch_dtype[name], device="cuda")
        self._bind(buffers)
        # The copies ran on torch's current stream; the engine runs on its own.
        torch.cuda.synchronize()
        return buffers

    def _set_shapes(self, buffers: dict[str, Any]) -> None:
        for name in self.input_names:
            shape = tuple(buffers[name].shape)
            if not self.context.set_input_shape(name, shape):
                raise PreconditionError(
                    f"the engine refuses shape {shape} for input {name} "
                    f"(profile {self.meta.profile})",
                    "widen the recipe's shapes or data.max_length and rebuild",
                )

    def _bind(self, buffers: dict[str, Any]) -> None:
        for name, tensor in buffers.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        self._bound = buffers

    def call(self, prepared: dict[str, Any]) -> dict[str, Any]:
        # The one execution context holds the shapes and addresses of the last feed bound; a
        # call with an earlier prepared feed binds it again (timing binds once per shape).
        if prepared is not self._bound:
            self._set_shapes(prepared)
            self._bind(prepared)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the log with -v)")
        self.stream.synchronize()
        return prepared

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        buffers = self.call(self.prepare(feed))
        return {
            name: buffers[name].float().cpu().numpy().astype(np.float32)
            for name in self.output_names
        }


def _torch_dtype(dtype: Any, torch: Any, trt: Any) -> Any:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
    }
    if dtype not in table:
        raise PreconditionError(f"engine I/O type {dtype} is not supported by the runner")
    return table[dtype]
