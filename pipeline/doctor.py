"""``tforge doctor``: which targets this machine can use, and why not when it cannot."""

from __future__ import annotations

from typing import Any

from pipeline import environment
from pipeline.targets import TARGETS, availability


def diagnose() -> dict[str, Any]:
    targets = [availability(t) for t in TARGETS]
    return {
        "targets": [
            {"name": t.target, "available": t.available, "detail": t.detail} for t in targets
        ],
        "gpus": environment.gpu_records(),
        "hardware": {k: v for k, v in environment.hardware().items() if k != "gpus"},
        "versions": environment.tool_versions(),
    }
