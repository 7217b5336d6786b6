"""``tforge doctor``: which targets this machine can use, and why not when it cannot."""

from __future__ import annotations

from typing import Any

from pipeline import environment
from pipeline.targets import TARGETS, availability, gpus


def diagnose() -> dict[str, Any]:
    targets = [availability(t) for t in TARGETS]
    return {
        "targets": [
            {"name": t.target, "available": t.available, "detail": t.detail} for t in targets
        ],
        "gpus": [
            {
                "name": g.name,
                "compute_capability": g.compute_capability,
                "driver": g.driver,
                "memory_mb": g.memory_mb,
            }
            for g in gpus()
        ],
        "hardware": environment.hardware(),
        "versions": environment.tool_versions(),
    }
