"""Which compile targets this machine can use, and what is missing when it cannot.

``ort-cpu`` needs onnxruntime; ``ort-openvino`` needs onnxruntime >= 1.23 and the
onnxruntime-ep-openvino plugin (its CPU device); ``ort-cuda`` needs onnxruntime-gpu (its CUDA execution provider)
and an NVIDIA GPU; ``tensorrt`` needs the tensorrt package, an NVIDIA GPU, and torch with CUDA
(its device buffers). GPUs are read from ``nvidia-smi`` so that asking costs no CUDA library
import. A build checks its variants' targets before any stage runs (:func:`require`), and
``tforge doctor`` lists them all (:func:`availability`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import TargetUnavailable

if TYPE_CHECKING:
    from pipeline.recipe import Recipe

TARGETS = ("ort-cpu", "ort-openvino", "ort-cuda", "tensorrt")


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str
    driver: str
    memory_mb: int
    #: nvidia-smi's index (PCI bus order) and UUID, by which CUDA_VISIBLE_DEVICES names GPUs.
    index: int = 0
    uuid: str = ""


SMI_FIELDS = "name,compute_cap,driver_version,memory.total,index,uuid"


def parse_smi(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=<SMI_FIELDS> --format=csv,noheader,nounits`` (without the
    last two columns, GPUs are numbered in the order listed)."""
    gpus: list[Gpu] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) not in (4, 6) or not parts[0]:
            continue
        name, capability, driver, memory = parts[:4]
        index, uuid = len(gpus), ""
        if len(parts) == 6:
            index = int(parts[4]) if parts[4].isdigit() else index
            uuid = parts[5]
        megabytes = int(float(memory)) if memory.replace(".", "").isdigit() else 0
        gpus.append(Gpu(name, capability, driver, megabytes, index, uuid))
    return gpus


def visible(devices: list[Gpu], setting: str | None) -> list[Gpu]:
    """The GPUs a CUDA process sees under ``CUDA_VISIBLE_DEVICES=setting``, in its order.

    Entries are indices, (prefixes of) GPU UUIDs, or MIG instances (``MIG-GPU-<uuid>/gi/ci``
    names its GPU). CUDA stops at the first entry it cannot match; an empty setting hides every
    GPU, and a repeated one yields none. Indices are read in nvidia-smi's (PCI) order, which is
    CUDA's under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; CUDA's default order (fastest first) can
    differ from it only between GPUs of different models. A MIG instance named by its own UUID
    (``MIG-<uuid>``) cannot be traced to its GPU from this listing: the GPUs are then kept as
    listed."""
    if setting is None:
        return devices
    chosen: list[Gpu] = []
    for entry in (e.strip() for e in setting.split(",")):
        if entry.startswith("MIG-GPU-"):
            entry = entry[len("MIG-") :].split("/")[0]
        elif entry.startswith("MIG-"):
            return devices
        found = [
            g
            for g in devices
            if (entry.isdigit() and g.index == int(entry))
            or (entry.startswith("GPU-") and g.uuid.startswith(entry))
        ]
        if len(found) != 1:
            break
        if found[0] in chosen:
            return []
        chosen.append(found[0])
    return chosen


def _hidden_by() -> str:
    setting = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "nvidia-smi" if setting is None else f"nvidia-smi, CUDA_VISIBLE_DEVICES={setting!r}"


@functools.cache
def gpus() -> tuple[Gpu, ...]:
    """The NVIDIA GPUs this process's CUDA sees (nvidia-smi's, less those CUDA_VISIBLE_DEVICES
    hides); none when nvidia-smi is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        result = subprocess.run(
            [
                smi,
                f"--query-gpu={SMI_FIELDS}",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if result.returncode != 0:
        return ()
    return tuple(visible(parse_smi(result.stdout), os.environ.get("CUDA_VISIBLE_DEVICES")))


@dataclass(frozen=True)
class Availability:
    target: str
    available: bool
    #: What runs it (versions, device) when available; what is missing and how to get it if not.
    detail: str


def _ort_providers() -> tuple[str | None, list[str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None, []
    return ort.__version__, list(ort.get_available_providers())


# ONNX Runtime lists its CUDA provider whenever onnxruntime-gpu is installed, and a session that
# cannot load it falls back to the CPU, printing why (a missing CUDA or cuDNN library) on the
# process's stderr rather than raising. So the provider is proven by starting one session on
# the GPU in a fresh interpreter and reading both streams. torch is imported first, as
# OrtRunner does: its CUDA and cuDNN libraries then serve ONNX Runtime too.
_CUDA_PROBE = """
import json
try:
    import torch  # noqa: F401
except ImportError:
    pass
import onnx
import onnx.helper as h
import onnxruntime as ort
x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])
y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])
graph = h.make_graph([h.make_node("MatMul", ["x", "x"], ["y"])], "probe", [x], [y])
model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
providers = [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]
session = ort.InferenceSession(model.SerializeToString(), providers=providers)
print(json.dumps(session.get_providers()))
"""
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_MISSING_LIBRARY = re.compile(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file")


def read_cuda_probe(returncode: int, stdout: str, stderr: str) -> str | None:
    """What keeps ONNX Runtime's CUDA provider from starting, from the probe's exit status and
    output; None when its session ran on the GPU."""
    lines = stdout.strip().splitlines()
    try:
        providers = json.loads(lines[-1]) if returncode == 0 and lines else []
    except json.JSONDecodeError:
        providers = []
    if providers and providers[0] == "CUDAExecutionProvider":
        return None
    stderr = _COLOUR.sub("", stderr)
    missing = sorted(set(_MISSING_LIBRARY.findall(stderr)))
    if missing:
        return (
            f"ONNX Runtime's CUDA provider does not load: {', '.join(missing)} not found "
            "(install the CUDA and cuDNN versions this onnxruntime-gpu is built for, or a torch "
            "built for them: its libraries serve ONNX Runtime too)"
        )
    said = [line.strip() for line in stderr.splitlines() if line.strip()]
    why = said[-1][:300] if said else f"exit status {returncode}"
    if providers:
        why = f"its session ran on {', '.join(providers)} instead ({why})"
    return f"ONNX Runtime's CUDA provider does not start: {why}"


@functools.cache
def cuda_provider_problem() -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run a session here; None when it can. Asked
    only where onnxruntime-gpu is installed and nvidia-smi sees a GPU (one probe per process)."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", _CUDA_PROBE],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "ONNX Runtime's CUDA provider did not start a session within 120 s"
    return read_cuda_probe(result.returncode, result.stdout, result.stderr)


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def availability(target: str) -> Availability:
    devices = gpus()
    names = ", ".join(g.name for g in devices)
    if target == "ort-cpu":
        version, providers = _ort_providers()
        if version is None:
            return Availability(
                target, False, "onnxruntime does not import: pip install onnxruntime"
            )
        return Availability(
            target, True, f"onnxruntime {version}; providers {', '.join(providers)}"
        )
    if target == "ort-openvino":
        from pipeline.backends.openvino_backend import PACKAGE, cpu_device

        try:
            device = cpu_device()
        except ImportError:
            return Availability(
                target, False, "onnxruntime does not import: pip install onnxruntime"
            )
        except TargetUnavailable as error:
            return Availability(target, False, str(error))
        return Availability(
            target,
            True,
            f"{PACKAGE} {device.plugin_version} on {device.name} "
            f"(OpenVINO CPU: {' '.join(device.capabilities)})",
        )
    if target == "ort-cuda":
        version, providers = _ort_providers()
        if "CUDAExecutionProvider" not in providers:
            return Availability(
                target,
                False,
                "needs onnxruntime-gpu (pip uninstall onnxruntime, then pip install 'tforge[gpu]')",
            )
        if not devices:
            return Availability(
                target,
                False,
                f"onnxruntime-gpu is installed but no NVIDIA GPU is visible ({_hidden_by()})",
            )
        if not _torch_cuda():
            return Availability(
                target,
                False,
                f"onnxruntime-gpu {version} on {names}, but torch has no CUDA (a GPU build times "
                "PyTorch eager, its floor and memory probe on the GPU): install a CUDA build of torch",
            )
        problem = cuda_provider_problem()
        if problem is not None:
            return Availability(target, False, problem)
        return Availability(target, True, f"onnxruntime-gpu {version}, CUDA provider on {names}")
    if target == "tensorrt":
        try:
            import tensorrt
        except ImportError:
            return Availability(
                target,
                False,
                "tensorrt is not installed (pip install 'tforge[tensorrt]' on a machine with an NVIDIA GPU)",
            )
        if not devices:
            return Availability(
                target,
                False,
                f"tensorrt {tensorrt.__version__} is installed but no NVIDIA GPU is visible "
                f"({_hidden_by()})",
            )
        if not _torch_cuda():
            return Availability(
                target,
                False,
                f"tensorrt {tensorrt.__version__} on {names}, but torch has no CUDA (its tensors hold "
                "the engine's device buffers): install a CUDA build of torch",
            )
        return Availability(target, True, f"tensorrt {tensorrt.__version__} on {names}")
    raise ValueError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")


def require(targets: set[str], precisions: Collection[tuple[str, str]] = ()) -> None:
    """Raise :class:`TargetUnavailable` naming what is missing for the first unusable target,
    or for a (target, precision) pair this machine cannot compute (bf16 without bfloat16)."""
    for target in sorted(targets):
        found = availability(target)
        if not found.available:
            raise TargetUnavailable(
                f"target {target} is not available on this machine: {found.detail}",
                "run `tforge doctor` to see which targets are, or build this variant elsewhere",
            )
    if ("ort-openvino", "bf16") in precisions:
        from pipeline.backends.openvino_backend import cpu_device, require_bf16

        require_bf16(cpu_device())


def unusable_variants(recipe: Recipe) -> dict[str, str]:
    """Variant name -> why this machine cannot build it (its target, its precision there, or
    NNCF): what ``require`` and ``require_nncf`` would refuse, per variant."""
    found: dict[str, str] = {}
    for variant in recipe.variants:
        try:
            require({variant.target}, {(variant.target, variant.precision)})
            if variant.quantize is not None and variant.quantize.quantizer == "nncf":
                require_nncf()
        except TargetUnavailable as error:
            found[variant.name] = error.message
    return found


def buildable(recipe: Recipe) -> tuple[Recipe, dict[str, str]]:
    """The recipe less the variants this machine cannot build, and why each was left out."""
    skipped = unusable_variants(recipe)
    return (recipe.without_variants(skipped) if skipped else recipe), skipped


def require_nncf() -> None:
    """Static INT8 with ``quantizer: nncf`` needs NNCF; said before any stage runs."""
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        raise TargetUnavailable(
            "quantize.quantizer nncf (the ort-openvino default for static INT8) needs NNCF, "
            "which is not installed",
            "pip install 'tforge[openvino]', or set quantizer: onnxruntime",
        )
