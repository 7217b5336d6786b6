"""What a result depends on beyond its inputs: tool versions and the hardware it ran on.

Stage keys include the versions of the tools that produce bytes (so an exporter upgrade
rebuilds), and measuring stages also include the hardware (a latency measured on one CPU is
not reused on another). Nothing here imports torch or onnxruntime: versions come from package
metadata, hardware from the OS.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

import pipeline

#: Distributions whose versions can change what a stage produces.
TOOLS = (
    "torch",
    "transformers",
    "tokenizers",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-ep-openvino",
    "nncf",
    "onnxscript",
    "onnx-ir",
    "numpy",
    "safetensors",
    "tensorrt",
)

#: CPU features that decide which kernels ONNX Runtime and PyTorch pick.
CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


#: Distributions that install the same module: where both are present, only the copy Python
#: imports ran anything (onnxruntime-gpu installed beside, or ahead of, the CPU package).
SAME_MODULE = {"onnxruntime": "onnxruntime", "onnxruntime-gpu": "onnxruntime"}


def _shadowed(name: str) -> bool:
    """Whether ``name``'s copy of its module is not the one this process runs: hidden by a
    copy earlier on sys.path, or not the one already imported (find_spec then returns the
    imported module's spec). Found without importing anything."""
    import importlib.util

    module = SAME_MODULE.get(name)
    if module is None:
        return False
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    mine = Path(str(metadata.distribution(name).locate_file(f"{module}/__init__.py")))
    return mine.resolve() != Path(spec.origin).resolve()


@functools.cache
def tool_versions() -> dict[str, str]:
    versions = {"tforge": pipeline.__version__, "python": platform.python_version()}
    for name in TOOLS:
        version = package_version(name)
        if version is not None and not _shadowed(name):
            versions[name] = version
    return versions


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return info
    for line in path.read_text(errors="replace").splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    return info


@functools.cache
def hardware() -> dict[str, Any]:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu": info.get("model name") or platform.processor() or "unknown",
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "logical_cores": psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        # A GPU build's timings and engines are the GPU's: recorded beside the CPU (none on a
        # machine without NVIDIA GPUs).
        "gpus": gpu_records(),
    }


def gpu_records() -> list[dict[str, Any]]:
    """The NVIDIA GPUs this process's CUDA sees (pipeline.targets.gpus: nvidia-smi's, less those
    CUDA_VISIBLE_DEVICES hides; no CUDA library is loaded). The first is the one tforge uses."""
    from pipeline.targets import gpus

    return [
        {
            "name": g.name,
            "compute_capability": g.compute_capability,
            "driver": g.driver,
            "memory_mb": g.memory_mb,
        }
        for g in gpus()
    ]


#: x86 instructions that multiply unsigned by signed 8-bit values into 32-bit sums directly.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_products_saturate(flags: list[str] | None = None) -> bool:
    """Whether ONNX Runtime's CPU INT8 products can saturate on this machine.

    Without VNNI, its x86 kernels multiply unsigned 8-bit activations by signed 8-bit weights
    with VPMADDUBSW, which adds each pair of products into a saturating 16-bit sum: two
    products of 255 x 127 overflow it, and large activations meet large weights in every
    Transformer. ONNX Runtime's documentation advises 7-bit weights (``reduce_range``) on
    such CPUs. Measured on an AVX2-only AMD EPYC (BENCHMARKS.md, "INT8 weights on a CPU
    without VNNI"): the tiny random decoders' teacher-forced agreement is 0.81-0.92 with 8-bit
    weights and 0.94-1.0 with 7-bit ones; MiniLM is the same either way (mean cosine 0.98838
    and 0.98810).
    ``flags``: the CPU's (default: this machine's, from /proc/cpuinfo).
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False  # ARM's dot-product instructions sum into 32 bits
    have = set(flags if flags is not None else _cpuinfo().get("flags", "").split())
    return "avx2" in have and not have & set(VNNI_FLAGS)


def default_threads() -> int:
    """Intra-op threads when the recipe does not say: one per usable physical core."""
    hw = hardware()
    return max(1, min(int(hw["physical_cores"]), int(hw["usable_cores"] or 1)))


def facets(names: tuple[str, ...]) -> dict[str, Any]:
    """The environment parts a stage's key depends on."""
    out: dict[str, Any] = {}
    if "versions" in names:
        out["versions"] = tool_versions()
    if "hardware" in names:
        hw = hardware()
        out["hardware"] = {
            k: hw[k]
            for k in (
                "machine",
                "cpu",
                "physical_cores",
                "logical_cores",
                "usable_cores",
                "cpu_flags",
            )
        }
    if "gpu" in names:
        # Engines and CUDA timings are per GPU model and driver.
        keep = ("name", "compute_capability", "driver")
        out["gpu"] = [{k: g[k] for k in keep} for g in gpu_records()]
    return out


def describe() -> dict[str, Any]:
    """Everything recorded in a manifest about where the build ran."""
    return {
        "versions": tool_versions(),
        "hardware": hardware(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    On Linux this is VmHWM, the high-water mark of the current address space. ``ru_maxrss`` is
    not usable for a freshly spawned process: Linux carries it over from the pre-exec image, so
    a child of a large parent reads the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)
