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
import shutil
import subprocess
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


def parse_smi(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0]:
            continue
        name, capability, driver, memory = parts
        gpus.append(
            Gpu(
                name,
                capability,
                driver,
                int(float(memory)) if memory.replace(".", "").isdigit() else 0,
            )
        )
    return gpus


@functools.cache
def gpus() -> tuple[Gpu, ...]:
    """NVIDIA GPUs seen by the driver; none when nvidia-smi is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        result = subprocess.run(
            [
                smi,
                "--query-gpu=name,compute_cap,driver_version,memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(parse_smi(result.stdout)) if result.returncode == 0 else ()


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
                "onnxruntime-gpu is installed but no NVIDIA GPU is visible (nvidia-smi)",
            )
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
                f"tensorrt {tensorrt.__version__} is installed but no NVIDIA GPU is visible",
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
