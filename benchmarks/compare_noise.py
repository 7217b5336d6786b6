"""How often does ``tforge compare`` call an unchanged build a regression?

Builds the default recipe (models/minilm.yaml), then re-measures its latency ``--runs`` times
(nothing else changes: every other stage comes from the cache). Every ordered pair of those
measurements is an A/A comparison — same models, same machine — so every latency regression it
reports is a false alarm. Counted per latency basis (p50, speed-up over PyTorch eager) and
threshold, with the noise band and without it (``noise_sigmas=0``), and the relative changes seen.

    python -m benchmarks.compare_noise --runs 6     # about a minute per run on 2 cores

Writes the "compare_noise" entry of benchmarks/results.json and re-renders BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
THRESHOLDS = (0.05, 0.10)


def measure(runs: int, artifacts: Path) -> list[Any]:
    from pipeline.build import BuildOptions, build
    from pipeline.recipe import load_recipe

    recipe = load_recipe(ROOT / "models" / "minilm.yaml")
    reports = []
    for i in range(runs):
        outcome = build(recipe, BuildOptions(artifacts=artifacts, remeasure=i > 0))
        reports.append(outcome.report)
        print(f"measurement {i + 1}/{runs}: {outcome.run_dir.name}", flush=True)
    return reports


def false_alarms(reports: list[Any]) -> list[dict[str, Any]]:
    from pipeline.report.compare import Thresholds, compare

    rows = []
    pairs = list(itertools.permutations(reports, 2))
    for basis in ("p50", "speedup"):
        for threshold in THRESHOLDS:
            for sigmas in (0.0, 3.0):
                t = Thresholds(
                    max_latency_regression=threshold, latency_basis=basis, noise_sigmas=sigmas
                )
                figures = regressions = 0
                changes: list[float] = []
                for base, cand in pairs:
                    latency = [d for d in compare(base, cand, t).deltas if d.shape]
                    figures += len(latency)
                    regressions += sum(d.status == "regression" for d in latency)
                    changes += [abs(d.change) for d in latency if d.change is not None]
                rows.append(
                    {
                        "basis": basis,
                        "threshold": threshold,
                        "noise_sigmas": sigmas,
                        "pairs": len(pairs),
                        "figures": figures,
                        "false_regressions": regressions,
                        "max_abs_change": round(max(changes), 4),
                        "median_abs_change": round(sorted(changes)[len(changes) // 2], 4),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="compare-noise-") as work:
        reports = measure(args.runs, Path(work))
    rows = false_alarms(reports)
    for row in rows:
        print(json.dumps(row))
    from benchmarks.markdown import record

    record(
        "compare_noise",
        {
            "command": f"python -m benchmarks.compare_noise --runs {args.runs}",
            "runs": args.runs,
            "shapes": reports[0].shapes,
            "variants": [c.name for c in reports[0].contenders if c.kind == "variant"],
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
