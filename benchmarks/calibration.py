"""Calibration at scale: 512 samples at s128 with each method, memory, time and determinism.

Every text is made long enough to fill 128 tokens (consecutive shipped calibration sentences
joined), so each batch is 8 x 128: the worst case for a calibrator that keeps activations. Each
run is a fresh process (the `calibrate` stage on MiniLM's INT8 float graph, from the benchmark's
tforge build) reporting its peak RSS; each method runs twice and the two tables are compared
byte for byte.

    python -m benchmarks.calibration     # after python -m benchmarks.run (uses its build)

Writes the "calibration" entry of benchmarks/results.json and re-renders BENCHMARKS.md.
"""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
WORK = HERE / ".work"
BUILD = WORK / "tforge" / "minilm"
METHODS = ("minmax", "entropy", "percentile")
SAMPLES = 512
LENGTH = 128


def long_texts(path: Path) -> Path:
    """512 texts of 128+ tokens each: shipped calibration sentences joined in file order."""
    sentences = [
        json.loads(line)["text"]
        for line in (ROOT / "calibration" / "calibration.jsonl").read_text().splitlines()
    ]
    out, i = [], 0
    for _ in range(SAMPLES):
        words: list[str] = []
        while len(words) < LENGTH:
            words += sentences[i % len(sentences)].split()
            i += 1
        out.append(json.dumps({"text": " ".join(words)}))
    path.write_text("\n".join(out) + "\n")
    return path


def _stage_output(manifest: dict[str, Any], step: str, name: str) -> Path:
    record = next(s for s in manifest["stages"] if s["step"] == step)
    key = record["key"]
    return BUILD / "cache" / key[:2] / key / record["outputs"][name]["path"]


def once(method: str, data: Path, out: Path) -> dict[str, Any]:
    """One calibration in this process (run in a fresh one by main)."""
    from pipeline.artifacts import Artifact
    from pipeline.stages.base import BuildContext
    from pipeline.stages.calibrate import TABLE, CalibrateConfig, CalibrateStage

    manifest = json.loads((BUILD / "runs" / "bench" / "manifest.json").read_text())
    inputs = {
        "model": Artifact.of("model", _stage_output(manifest, "optimize[int8]", "model")),
        "info": Artifact.of("info", _stage_output(manifest, "load", "info")),
        "calibration": Artifact.of("calibration", data),
    }
    config = CalibrateConfig(method=method, samples=SAMPLES, max_length=LENGTH)
    start = time.perf_counter()
    result = CalibrateStage(config).run(BuildContext(), inputs, out)
    seconds = time.perf_counter() - start
    table = (out / "calibration" / TABLE).read_bytes()
    return {
        "method": method,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "sha256": hashlib.sha256(table).hexdigest(),
        "tokens": result.stats["tokens"],
        "truncated": result.stats["truncated"],
        "tensors": result.stats["tensors"],
    }


def main() -> None:
    runs = []
    with tempfile.TemporaryDirectory(prefix="calibration-bench-") as work:
        data = long_texts(Path(work) / "long.jsonl")
        for method in METHODS:
            for attempt in (1, 2):
                out = Path(work) / f"{method}-{attempt}"
                out.mkdir()
                code = (
                    "import json, sys; from pathlib import Path; from benchmarks.calibration import once; "
                    f"print(json.dumps(once({method!r}, Path({str(data)!r}), Path({str(out)!r}))))"
                )
                done = subprocess.run(
                    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
                )
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-2000:])
                run = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"{method} #{attempt}: {run['seconds']}s, peak RSS {run['peak_rss_mb']} MB",
                    flush=True,
                )
                runs.append(run)
    summary = []
    for method in METHODS:
        pair = [r for r in runs if r["method"] == method]
        summary.append({**pair[0], "identical": pair[0]["sha256"] == pair[1]["sha256"]})
    from benchmarks.markdown import record

    record(
        "calibration",
        {
            "command": "python -m benchmarks.calibration",
            "samples": SAMPLES,
            "max_length": LENGTH,
            "runs": summary,
        },
    )


if __name__ == "__main__":
    main()
