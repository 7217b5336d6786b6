"""Writes ``fixtures/manifest.json``: a real build's manifest for the golden report tests.

A tiny random BERT built twice through the whole pipeline (FP32, dynamic INT8 and a budgeted
INT8 variant, with gates), the second build compared with the first, so the fixture holds every
section a report can have, failures included: a size gate the FP32 variant cannot meet, and a
baseline that also built an FP16 variant (missing from the candidate: a regression). The golden files are rendered from it by the tests (set
``TFORGE_UPDATE_GOLDEN=1`` to rewrite them after a deliberate change of a renderer).

    python -m tests.report.make_fixture
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline.build import BuildOptions, build
from tests.conftest import tiny_recipe
from tests.tiny import make_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = make_checkpoint(root / "tiny-bert", "bert", "feature-extraction")
        variants = [
            {"name": "fp32", "precision": "fp32"},
            {"name": "int8", "precision": "int8"},
            {
                "name": "int8-budget",
                "precision": "int8",
                "quantize": {"budget": {"min_mean_cosine": 0.99999999}},
            },
        ]
        gates = {"min_mean_cosine": 0.999, "max_size_mb": 0.1, "variants": ["fp32"]}
        recipe = tiny_recipe(source, variants=variants, gates=gates)
        before = tiny_recipe(
            source, variants=[*variants, {"name": "fp16", "precision": "fp16"}], gates=gates
        )
        artifacts = root / "artifacts"
        first = build(before, BuildOptions(artifacts=artifacts, run_id="baseline"))
        second = build(
            recipe,
            BuildOptions(artifacts=artifacts, run_id="candidate", baseline=first.report),
        )
        FIXTURES.mkdir(exist_ok=True)
        shutil.copyfile(second.run_dir / "manifest.json", FIXTURES / "manifest.json")
        print(f"wrote {FIXTURES / 'manifest.json'}")


if __name__ == "__main__":
    main()
