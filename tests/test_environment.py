"""Provenance: the tool versions a manifest records are those of the code that ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = "import json; from pipeline.environment import tool_versions; print(json.dumps(tool_versions()))"


def _versions(*ahead: Path) -> dict[str, str]:
    """tool_versions() in a fresh interpreter with ``ahead`` first on its path."""
    path = os.pathsep.join([*map(str, ahead), str(ROOT), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", VERSIONS],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(result.stdout))


def test_a_shadowed_onnxruntime_is_not_recorded(tmp_path: Path) -> None:
    """onnxruntime-gpu installed ahead of the CPU package (as a --target install puts it)
    provides the ``onnxruntime`` that Python imports; the CPU package's version then describes
    nothing that ran, and is left out."""
    assert _versions()["onnxruntime"] == metadata.version("onnxruntime")
    ahead = tmp_path / "ahead"
    (ahead / "onnxruntime").mkdir(parents=True)
    (ahead / "onnxruntime" / "__init__.py").write_text("")
    versions = _versions(ahead)
    assert "onnxruntime" not in versions
    assert versions["onnx"] == metadata.version("onnx")  # other tools are untouched
