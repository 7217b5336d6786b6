"""Stage ``calibrate``: activation ranges of a float graph on calibration text.

Draws ``samples`` texts from the calibration data with a seed, tokenises them with the model's
tokenizer (cut to ``max_length``, and said so), and runs ONNX Runtime's calibrator (MinMax,
Entropy or Percentile) over the inputs and outputs of the ops that will be quantized.

Memory stays bounded: the calibrator is given one batch at a time. ONNX Runtime's own
``collect_data`` keeps every output of every batch it is given before reducing them (the
histogram calibrators hold all activations of the whole data set, onnxruntime#10503, and crash
when batches differ in length); fed batch by batch, MinMax merges running ranges and the
histogram methods merge each batch into their histograms, so peak memory is one batch of
activations whatever the sample count.

Output: ``calibration/table.json`` (see pipeline.calibration.table) and
``calibration/calibration.cache`` (the same ranges as a TensorRT calibration cache). The key
holds the float graph's hash, the data's hash and the settings, so every build and variant with
the same three reuses the table.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from pipeline.artifacts import Artifact
from pipeline.calibration import draw_samples
from pipeline.calibration.table import CalibrationTable
from pipeline.calibration.tokens import TokenBatches, token_batches
from pipeline.errors import PreconditionError
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.export import MODEL_FILE, require_model_file, uses_external_data
from pipeline.stages.load import CheckpointInfo
from pipeline.stages.quantize import quiet_quantizer

log = logging.getLogger(__name__)

TABLE = "table.json"
TENSORRT_CACHE = "calibration.cache"


class CalibrateConfig(StageConfig):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    #: Symmetric ranges (|lowest| = highest): what signed INT8 activations and TensorRT take.
    symmetric: bool = False
    #: Percentile method: the share of values the range keeps, in (0, 100].
    percentile: float = 99.999
    #: Histogram bins (entropy, percentile).
    num_bins: int = 2048
    samples: int = 512
    seed: int = 0
    batch_size: int = 8
    max_length: int = 128
    text_field: str = "text"
    #: The op types whose inputs and outputs are calibrated (those the quantizer will quantize).
    op_types: tuple[str, ...] = ("MatMul",)


class _OneBatch:
    """A calibration data reader holding one feed (ORT's CalibrationDataReader protocol)."""

    def __init__(self, feed: dict[str, Any]) -> None:
        self._feed: dict[str, Any] | None = feed

    def get_next(self) -> dict[str, Any] | None:
        feed, self._feed = self._feed, None
        return feed


def _calibrator_options(config: CalibrateConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"symmetric": config.symmetric}
    if config.method == "entropy":
        options.update(num_bins=config.num_bins, num_quantized_bins=128)
    elif config.method == "percentile":
        options.update(num_bins=config.num_bins, percentile=config.percentile)
    return options


def collect_ranges(
    model_path: Path,
    feeds: list[dict[str, Any]],
    config: CalibrateConfig,
    work: Path,
    advance: Any = None,
) -> dict[str, tuple[float, float]]:
    """Tensor name -> (lowest, highest) over ``feeds``, fed to the calibrator one at a time."""
    from onnxruntime.quantization.calibrate import CalibrationMethod

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.method]
    with quiet_quantizer():
        return _collect(model_path, feeds, config, work, advance, method)


def _collect(
    model_path: Path,
    feeds: list[dict[str, Any]],
    config: CalibrateConfig,
    work: Path,
    advance: Any,
    method: Any,
) -> dict[str, tuple[float, float]]:
    import onnx
    from onnxruntime.quantization.calibrate import create_calibrator

    external = uses_external_data(onnx.load(str(model_path), load_external_data=False))
    calibrator = create_calibrator(
        model_path,
        list(config.op_types),
        augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=method,
        use_external_data_format=external,
        providers=["CPUExecutionProvider"],
        extra_options=_calibrator_options(config),
    )
    for feed in feeds:
        calibrator.collect_data(_OneBatch(feed))
        if advance is not None:
            advance(1)
    data = calibrator.compute_data()
    ranges = {}
    for name, value in data.data.items():
        low, high = (np.asarray(v, dtype=np.float64).reshape(-1) for v in value.range_value)
        ranges[name] = (float(low.min()), float(high.max()))
    return ranges


class _DrawSettings(Protocol):
    @property
    def samples(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def max_length(self) -> int: ...
    @property
    def text_field(self) -> str: ...


def calibration_feeds(
    inputs: Mapping[str, Artifact], cfg: _DrawSettings
) -> tuple[list[Any], TokenBatches, int]:
    """Samples drawn from the ``calibration`` input with the stage's seed, tokenised by the
    ``model`` folder's tokenizer in batches, cut to the model's and the stage's max length
    (said so when any text was cut). Returns (samples, batches, max_length)."""
    from transformers import AutoTokenizer

    info = CheckpointInfo.read(inputs["info"])
    samples = draw_samples(
        inputs["calibration"].path,
        kind="calibration",
        count=cfg.samples,
        seed=cfg.seed,
        text_field=cfg.text_field,
    )
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"].path)
    max_length = min(cfg.max_length, info.max_length or cfg.max_length)
    batches = token_batches(
        tokenizer, [s.text for s in samples], info.inputs, cfg.batch_size, max_length
    )
    if batches.truncated:
        log.warning(
            "%d of %d calibration samples are longer than %d tokens and were cut to it",
            batches.truncated,
            len(samples),
            max_length,
        )
    return samples, batches, max_length


class CalibrateStage(Stage[CalibrateConfig]):
    name = "calibrate"
    # Activations come from ONNX Runtime's kernels, which differ by instruction set.
    facets = ("versions", "hardware")

    def requires(self, inputs: Mapping[str, Artifact]) -> None:
        require_model_file("calibrate", inputs["model"].path)

    def describe(self) -> str:
        return f"calibrate {self.config.method} ({self.config.samples} samples)"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        cfg = self.config
        source = inputs["model"].path
        samples, batches, max_length = calibration_feeds(inputs, cfg)
        with (
            tempfile.TemporaryDirectory(prefix="calibrate-", dir=out) as work,
            ctx.progress.task(f"calibrate ({cfg.method})", len(batches.feeds)) as advance,
        ):
            ranges = collect_ranges(source / MODEL_FILE, batches.feeds, cfg, Path(work), advance)
        if not ranges:
            raise PreconditionError(
                f"calibration found no float tensors around {list(cfg.op_types)} ops",
                "calibrate an optimized graph (optimize: ort or standard), which carries value types",
            )
        table = CalibrationTable(
            method=cfg.method,
            symmetric=cfg.symmetric,
            ranges=ranges,
            meta={
                "samples": len(samples),
                "seed": cfg.seed,
                "max_length": max_length,
                "batch_size": cfg.batch_size,
                "data_sha256": inputs["calibration"].sha256,
                "model_sha256": inputs["model"].sha256,
                **({"percentile": cfg.percentile} if cfg.method == "percentile" else {}),
                **({"num_bins": cfg.num_bins} if cfg.method != "minmax" else {}),
            },
        )
        folder = out / "calibration"
        folder.mkdir()
        (folder / TABLE).write_text(table.to_json(), encoding="utf-8")
        (folder / TENSORRT_CACHE).write_text(table.tensorrt_cache(), encoding="utf-8")
        return StageResult(
            outputs={"calibration": "calibration"},
            stats={
                "method": cfg.method,
                "samples": len(samples),
                "batches": len(batches.feeds),
                "tokens": batches.tokens,
                "truncated": batches.truncated,
                "max_length": max_length,
                "tensors": len(ranges),
            },
        )
