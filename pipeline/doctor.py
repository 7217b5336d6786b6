"""``tforge doctor``: which targets this machine can use, and why not when it cannot."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from pipeline import environment


def _gpu_names() -> list[str]:
    """NVIDIA GPUs seen by the driver (nvidia-smi), without importing a CUDA library."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        result = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return (
        [line.strip() for line in result.stdout.splitlines() if line.strip()]
        if result.returncode == 0
        else []
    )


def diagnose() -> dict[str, Any]:
    versions = environment.tool_versions()
    targets: list[dict[str, Any]] = []
    providers: list[str] = []
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
        targets.append(
            {
                "name": "ort-cpu",
                "available": True,
                "detail": f"onnxruntime {ort.__version__}; providers {', '.join(providers)}",
            }
        )
    except ImportError as error:
        targets.append(
            {
                "name": "ort-cpu",
                "available": False,
                "detail": f"onnxruntime does not import ({error}); pip install onnxruntime",
            }
        )
    gpus = _gpu_names()
    if "CUDAExecutionProvider" not in providers:
        detail = "needs onnxruntime-gpu (pip install 'tforge[gpu]', after uninstalling onnxruntime)"
    elif not gpus:
        detail = "onnxruntime-gpu is installed but no NVIDIA GPU is visible (nvidia-smi)"
    else:
        detail = f"CUDA execution provider on {', '.join(gpus)}"
    targets.append(
        {
            "name": "ort-cuda",
            "available": "CUDAExecutionProvider" in providers and bool(gpus),
            "detail": detail,
        }
    )
    try:
        import tensorrt

        trt_detail = f"tensorrt {tensorrt.__version__}" + (
            "" if gpus else "; but no NVIDIA GPU is visible"
        )
        targets.append({"name": "tensorrt", "available": bool(gpus), "detail": trt_detail})
    except ImportError:
        targets.append(
            {
                "name": "tensorrt",
                "available": False,
                "detail": "tensorrt is not installed (pip install 'tforge[tensorrt]' on a CUDA machine)",
            }
        )
    return {
        "targets": targets,
        "gpus": gpus,
        "hardware": environment.hardware(),
        "versions": versions,
    }
