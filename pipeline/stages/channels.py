"""Stage ``channels``: the largest magnitude of each input channel of every weight MatMul.

Runs the float graph over calibration text (drawn, tokenised and cut as the ``calibrate`` stage
does) and keeps, per MatMul weight, the running maximum of |x| for each of its input channels:
what ``quantize.outliers`` needs to pick the channels multiplied in float
(see pipeline.outliers). One batch of activations is held at a time.

Output: ``channels/ranges.json`` (weight name -> per-channel maxima, float32 values, sorted:
the same graph, data and seed give the same bytes). Keyed like the calibration table, so the
variants that share a float graph share it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from pipeline.artifacts import Artifact
from pipeline.errors import PreconditionError
from pipeline.outliers import channel_ranges, ranges_to_json, standout
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.calibrate import calibration_feeds
from pipeline.stages.export import MODEL_FILE, require_model_file

RANGES = "ranges.json"


class ChannelsConfig(StageConfig):
    samples: int = 128
    seed: int = 0
    batch_size: int = 8
    max_length: int = 128
    text_field: str = "text"
    threads: int = 1


class ChannelsStage(Stage[ChannelsConfig]):
    name = "channels"
    # Activations come from ONNX Runtime's kernels, which differ by instruction set.
    facets = ("versions", "hardware")

    def requires(self, inputs: Mapping[str, Artifact]) -> None:
        require_model_file("channels", inputs["model"].path)

    def key_config(self) -> dict[str, object]:
        config = super().key_config()
        del config["threads"]  # how fast, not what: the maxima do not depend on it
        return config

    def describe(self) -> str:
        return f"measure input channel ranges ({self.config.samples} samples)"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        cfg = self.config
        samples, batches, max_length = calibration_feeds(inputs, cfg)
        with ctx.progress.task("input channel ranges", len(batches.feeds)) as advance:

            def feeds() -> Iterator[dict[str, np.ndarray]]:
                for feed in batches.feeds:
                    yield feed
                    advance(1)

            ranges = channel_ranges(inputs["model"].path / MODEL_FILE, feeds(), cfg.threads)
        if not ranges:
            raise PreconditionError(
                "the graph has no MatMul with a constant weight to measure",
                "quantize.outliers applies to graphs with weight MatMuls (optimize: ort or standard)",
            )
        folder = out / "channels"
        folder.mkdir()
        (folder / RANGES).write_text(ranges_to_json(ranges), encoding="utf-8")
        ratios = [standout(r) for r in ranges.values()]
        return StageResult(
            outputs={"channels": "channels"},
            stats={
                "samples": len(samples),
                "batches": len(batches.feeds),
                "tokens": batches.tokens,
                "truncated": batches.truncated,
                "max_length": max_length,
                "weights": len(ranges),
                # How far the largest channel stands out, at worst (x the median channel).
                "largest_ratio": round(max(ratios, default=0.0), 1),
            },
        )
