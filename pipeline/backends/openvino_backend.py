"""ONNX Runtime with Intel's OpenVINO execution provider, on the CPU (target ``ort-openvino``).

The provider is a plugin: the PyPI package ``onnxruntime-ep-openvino`` carries it and its own
OpenVINO runtime, and ONNX Runtime (>= 1.23) loads it beside its CPU provider. The session API,
the graph files and the verification are the same as on ``ort-cpu``; what runs underneath are
OpenVINO's CPU kernels. That is worth a target of its own because OpenVINO does what ONNX
Runtime's CPU provider does not:

* bfloat16 arithmetic on CPUs that have it (AMX, AVX512-BF16), from the FP32 graph. On a Xeon
  with AMX (2 threads), all-MiniLM-L6-v2's fused graph runs at 4.4 ms at b1s128 and 25.5 ms at
  b8s128 in bf16 (mean cosine 0.99998 to PyTorch FP32), against 16 / 102 ms in FP32 on ONNX
  Runtime's CPU provider and 9.5 / 49 ms in its dynamic INT8;
* Q/DQ INT8 graphs (the static INT8 form TensorRT takes too) on integer kernels, with what is
  left in float at the same inference precision.

OpenVINO's settings are its own properties, passed through the provider's ``load_config``
(:func:`provider_options`): the inference precision (``f32`` for an FP32 variant, ``bf16``
for bf16, and for INT8 the float remainder in bf16 where the CPU has it, else f32), the thread
count, one stream and the latency hint; a variant with ``static_shapes`` also gets the
provider's ``reshape_input`` (one fixed shape per session, see pipeline.backends.static_shapes).
Sessions are created with ONNX Runtime's CPU fallback disabled: a node the provider does not
take fails the load instead of running, silently, on ONNX Runtime's own kernels (a timing that
would not be OpenVINO's).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import TargetUnavailable, first_line

#: The distribution that ships the provider.
PACKAGE = "onnxruntime-ep-openvino"
#: The provider's name in ONNX Runtime.
PROVIDER = "OpenVINOExecutionProvider"
#: The name tforge registers the plugin library under (one registration per process).
REGISTRATION = "tforge-openvino"
#: The PCI vendor id ONNX Runtime reports for Intel hardware.
INTEL_VENDOR_ID = 0x8086
#: Whether this process has registered the plugin: ONNX Runtime refuses a second registration,
#: and a plugin that loaded but found no device lists none to tell it apart by.
_registered = False

#: OpenVINO's inference precision per variant precision (see :func:`inference_precision`).
_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


@dataclass(frozen=True)
class OpenVinoDevice:
    """OpenVINO's CPU device as the plugin reports it."""

    #: The ONNX Runtime ``OrtEpDevice`` handle sessions are given.
    handle: Any
    plugin_version: str
    name: str
    #: OpenVINO's OPTIMIZATION_CAPABILITIES (``BF16``, ``INT8``, ``FP32``...).
    capabilities: tuple[str, ...]

    @property
    def native_bf16(self) -> bool:
        """The CPU computes in bfloat16 natively (AMX or AVX512-BF16)."""
        return "BF16" in self.capabilities


def parse_capabilities(text: str) -> tuple[str, ...]:
    """OpenVINO lists OPTIMIZATION_CAPABILITIES as one space-separated string."""
    return tuple(sorted({part for part in text.split() if part}))


@functools.cache
def cpu_device() -> OpenVinoDevice:
    """Register the plugin (once per process) and return OpenVINO's CPU device.

    Raises :class:`TargetUnavailable` saying what is missing: the package, an ONNX Runtime new
    enough for plugin providers, or a CPU device.
    """
    import onnxruntime as ort

    if not hasattr(ort, "register_execution_provider_library"):
        raise TargetUnavailable(
            f"onnxruntime {ort.__version__} cannot load plugin execution providers (needs >= 1.23)",
            "pip install -U onnxruntime",
        )
    try:
        import onnxruntime_ep_openvino as plugin
    except ImportError:
        raise TargetUnavailable(
            f"{PACKAGE} is not installed",
            "pip install 'tforge[openvino]' (Linux or Windows on x86-64)",
        ) from None
    global _registered
    if not _registered and not any(d.ep_name == PROVIDER for d in ort.get_ep_devices()):
        try:
            ort.register_execution_provider_library(REGISTRATION, plugin.get_library_path())
            _registered = True
        # ONNX Runtime reports a load failure of the library as a plain RuntimeError-like
        # pybind11 exception (a missing dependency, an ABI mismatch).
        except Exception as error:
            raise TargetUnavailable(
                f"ONNX Runtime {ort.__version__} could not load the OpenVINO provider from "
                f"{PACKAGE}: {first_line(error)}",
                f"install matching versions: pip install -U onnxruntime {PACKAGE}",
            ) from error
    found = [
        d
        for d in ort.get_ep_devices()
        if d.ep_name == PROVIDER and d.ep_metadata.get("ov_device") == "CPU"
    ]
    if not found:
        # The plugin claims a device only where ONNX Runtime reports Intel as its vendor.
        cpus = [
            d.device for d in ort.get_ep_devices() if d.device.type == ort.OrtHardwareDeviceType.CPU
        ]
        vendor = cpus[0].vendor if cpus else "unknown"
        if cpus and cpus[0].vendor_id != INTEL_VENDOR_ID:
            raise TargetUnavailable(
                f"the OpenVINO provider lists no CPU device: its plugin claims Intel devices "
                f"only, and this CPU's vendor is {vendor}",
                "build the ort-openvino variants on an Intel CPU, or leave them out "
                "(tforge build --skip-unavailable)",
            )
        raise TargetUnavailable(
            "the OpenVINO provider is loaded but lists no CPU device",
            "check that this CPU is x86-64 with at least SSE4.2 (OpenVINO's CPU plugin)",
        )
    device = found[0]
    metadata = dict(device.ep_metadata)
    return OpenVinoDevice(
        handle=device,
        plugin_version=str(metadata.get("version", "unknown")).split("+")[0],
        name=str(metadata.get("FULL_DEVICE_NAME", "CPU")),
        capabilities=parse_capabilities(str(metadata.get("OPTIMIZATION_CAPABILITIES", ""))),
    )


def inference_precision(precision: str, native_bf16: bool) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for a variant precision.

    fp32 runs in f32 and bf16 in bf16. An INT8 (Q/DQ) graph runs its integer parts on integer
    kernels and the rest in bf16 where the CPU has it natively, else in f32: OpenVINO's own
    default, and on AMX the cost of an op kept in float is then small (MiniLM: Q/DQ INT8 25.8
    ms at b8s128, bf16 25.5).
    """
    if precision in _PRECISIONS:
        return _PRECISIONS[precision]
    if precision == "int8":
        return "bf16" if native_bf16 else "f32"
    raise ValueError(f"target ort-openvino runs fp32, bf16 or int8 graphs, not {precision}")


def reshape_input(shapes: Mapping[str, Sequence[int]]) -> str:
    """The provider's ``reshape_input`` option: ``name[d0,d1],name[d0,d1]`` in input order."""
    for name, dims in shapes.items():
        if not name or any(c in name for c in "[],") or not dims or min(dims) < 1:
            raise ValueError(
                f"reshape_input needs a plain input name and positive dims: {name} {dims}"
            )
    return ",".join(f"{name}[{','.join(str(d) for d in dims)}]" for name, dims in shapes.items())


def provider_options(
    precision: str,
    threads: int,
    native_bf16: bool,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, str]:
    """The provider's options: OpenVINO properties for the CPU device, as ``load_config``, and
    with ``shapes`` (input name -> dims) the fixed input shapes the model is compiled for."""
    properties = {
        "INFERENCE_PRECISION_HINT": inference_precision(precision, native_bf16),
        "INFERENCE_NUM_THREADS": str(threads),
        # One inference at a time on all the threads: the latency a request sees.
        "NUM_STREAMS": "1",
        "PERFORMANCE_HINT": "LATENCY",
    }
    options = {"load_config": json.dumps({"CPU": properties}, sort_keys=True)}
    if shapes:
        options["reshape_input"] = reshape_input(shapes)
    return options


def require_bf16(device: OpenVinoDevice) -> None:
    """A bf16 variant on a CPU without native bfloat16 would run emulated or in f32: refused."""
    if not device.native_bf16:
        raise TargetUnavailable(
            f"precision bf16 needs a CPU with AMX or AVX512-BF16; OpenVINO reports "
            f"{device.name} with {' '.join(device.capabilities) or 'no capabilities'}",
            "build this variant as fp32 or int8, or on a CPU with bfloat16",
        )


def add_provider(
    options: Any,
    precision: str,
    threads: int,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> OpenVinoDevice:
    """Put the OpenVINO provider on ``options`` (an ``onnxruntime.SessionOptions``), with ONNX
    Runtime's CPU fallback disabled (and, with ``shapes``, fixed input shapes); returns the
    device."""
    device = cpu_device()
    if precision == "bf16":
        require_bf16(device)
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_provider_for_devices(
        [device.handle], provider_options(precision, threads, device.native_bf16, shapes)
    )
    return device
