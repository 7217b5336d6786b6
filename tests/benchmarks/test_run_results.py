"""benchmarks.run keeps what the other benchmark scripts recorded in results.json."""

import json
from pathlib import Path

from benchmarks.run import with_recorded_sections


def test_a_new_run_keeps_the_recorded_sections_and_replaces_its_own(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"timings": ["old"], "decoders": {"x": 1}, "calibration": [2]}))
    merged = with_recorded_sections({"timings": ["new"], "fusion": None}, path)
    assert merged == {
        "timings": ["new"],
        "fusion": None,
        "decoders": {"x": 1},
        "calibration": [2],
    }
    assert with_recorded_sections({"timings": []}, tmp_path / "none.json") == {"timings": []}
