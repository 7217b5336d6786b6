"""Provenance: the tool versions a manifest records are those of the code that ran."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from pipeline.environment import tool_versions


def test_a_shadowed_onnxruntime_is_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu installed ahead of the CPU package (as --target installs put it) provides
    the ``onnxruntime`` Python imports; the CPU package's version then describes nothing that ran."""
    installed = metadata.version("onnxruntime")
    tool_versions.cache_clear()
    try:
        assert tool_versions()["onnxruntime"] == installed
        ahead = tmp_path / "ahead"
        (ahead / "onnxruntime").mkdir(parents=True)
        (ahead / "onnxruntime" / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(ahead))
        tool_versions.cache_clear()
        versions = tool_versions()
        assert "onnxruntime" not in versions
        assert versions["onnx"] == metadata.version("onnx")  # other tools are untouched
    finally:
        monkeypatch.undo()
        tool_versions.cache_clear()
    assert tool_versions()["onnxruntime"] == installed
