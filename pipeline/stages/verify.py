"""Stage ``verify``: one variant against the recorded PyTorch outputs.

Runs the variant on every reference batch (each padding side) and measures:

* ``max_abs_error`` / ``mean_abs_error`` of the raw output, over real tokens only;
* feature-extraction: cosine of pooled, normalised embeddings (mean and worst) and
  nearest-neighbour agreement (does each text keep its closest other text?);
* classification: agreement of predicted labels (per text, or per real token);
* the task metric (accuracy) of both PyTorch and the variant, when the data has labels;
* ``nonfinite_outputs``: NaN or infinite values at real positions (any is a failure);
* ``error_quantiles``: the distribution of the per-text error (cosine distance of the pooled
  embedding for feature-extraction, else the text's max absolute error) as its 0th, 5th, ...,
  100th percentiles, for the report's error-distribution plot.

Each figure is taken per padding side and the worst side is reported. The stage only measures;
whether the figures are good enough is decided from the tolerances and gates, outside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import metrics
from pipeline.artifacts import Artifact
from pipeline.backends.runners import GPU_TARGETS, model_size, runner_for
from pipeline.progress import NullProgress, Progress
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.reference import ReferenceData

_HIGHER_IS_WORSE = ("max_abs_error", "mean_abs_error")
#: Percentiles of the per-text error recorded for the report's distribution plot.
QUANTILES = tuple(range(0, 101, 5))


def _quantiles(errors: np.ndarray) -> list[float] | None:
    if not errors.size or not np.all(np.isfinite(errors)):
        return None
    return [float(v) for v in np.percentile(errors, QUANTILES)]


def _row_max_errors(reference: np.ndarray, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each row's max absolute error over its real tokens (``[batch, seq, ...]`` outputs)."""
    diff = np.abs(reference.astype(np.float64) - output.astype(np.float64))
    diff = diff.reshape(diff.shape[0], diff.shape[1], -1).max(axis=2)
    return np.where(mask.astype(bool), diff, 0.0).max(axis=1)


def _side_metrics(
    ref: ReferenceData,
    side: str,
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    advance: Callable[[int], None],
) -> dict[str, Any]:
    task = ref.index["task"]
    n = ref.index["samples"]
    pooled_ref = pooled_out = None
    max_err = 0.0
    err_sum = err_count = 0.0
    agree = total = 0
    bad_values = 0
    predictions: list[Any] = [None] * n
    references: list[Any] = [None] * n
    row_errors = np.zeros(n)
    for batch in ref.batches(side):
        output = run(batch.feed)
        if output.shape != batch.output.shape:
            raise RuntimeError(
                f"variant output shape {output.shape} differs from PyTorch's {batch.output.shape}"
            )
        if task == "sequence-classification":
            bad_values += metrics.nonfinite(output)
            batch_max, batch_mean = metrics.token_errors(
                batch.output[:, None], output[:, None], np.ones((len(output), 1))
            )
            count = output.size
            got, of = metrics.label_agreement(batch.output, output)
            row_errors[batch.rows] = np.abs(
                batch.output.astype(np.float64) - output.astype(np.float64)
            ).max(axis=1)
            for i, row in enumerate(batch.rows):
                predictions[row] = int(np.argmax(output[i]))
                references[row] = int(np.argmax(batch.output[i]))
        else:
            bad_values += metrics.nonfinite(output, batch.mask)
            batch_max, batch_mean = metrics.token_errors(batch.output, output, batch.mask)
            count = int(batch.mask.sum()) * int(np.prod(batch.output.shape[2:]))
            row_errors[batch.rows] = _row_max_errors(batch.output, output, batch.mask)
            got = of = 0
            if task == "token-classification":
                got, of = metrics.label_agreement(batch.output, output, batch.mask)
                if batch.word_ids is not None:
                    for i, row in enumerate(batch.rows):
                        predictions[row] = metrics.word_labels(output[i], batch.word_ids[i])
                        references[row] = metrics.word_labels(batch.output[i], batch.word_ids[i])
            else:
                mode = ref.index["pooling"]
                p_ref, p_out = (
                    metrics.pool(batch.output, batch.mask, mode),
                    metrics.pool(output, batch.mask, mode),
                )
                if pooled_ref is None or pooled_out is None:
                    pooled_ref, pooled_out = (
                        np.zeros((n, p_ref.shape[1])),
                        np.zeros((n, p_ref.shape[1])),
                    )
                pooled_ref[batch.rows], pooled_out[batch.rows] = p_ref, p_out
        max_err = max(max_err, batch_max)
        err_sum += batch_mean * count
        err_count += count
        agree += got
        total += of
        advance(1)
    result: dict[str, Any] = {
        "max_abs_error": max_err,
        "mean_abs_error": err_sum / max(err_count, 1),
        "nonfinite_outputs": bad_values,
    }
    if pooled_ref is not None and pooled_out is not None:
        cos = metrics.cosine(pooled_ref, pooled_out)
        result["mean_cosine"] = float(cos.mean())
        result["worst_cosine"] = float(cos.min())
        result["agreement"] = metrics.neighbour_agreement(pooled_ref, pooled_out)
        row_errors = 1.0 - cos
    else:
        result["agreement"] = agree / max(total, 1)
    result["error_quantiles"] = _quantiles(row_errors)
    labels = ref.labels
    if labels is not None and all(p is not None for p in predictions):
        result["task_metric"] = _accuracy(predictions, labels)
        result["reference_task_metric"] = _accuracy(references, labels)
    return result


def _accuracy(predicted: list[Any], labels: list[Any]) -> float:
    correct = total = 0
    for p, label in zip(predicted, labels, strict=True):
        c, t = metrics.accuracy(p, label) if isinstance(label, list) else (int(p == label), 1)
        correct += c
        total += t
    return correct / max(total, 1)


def compare_to_reference(
    ref: ReferenceData,
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    progress: Progress | None = None,
    label: str = "verify",
) -> dict[str, Any]:
    """Accuracy figures of ``run`` (feed -> output) against the reference, worst side first."""
    progress = progress or NullProgress()
    total = sum(len(ref.index["sides"][side]) for side in ref.sides)
    with progress.task(label, total=total) as advance:
        per_side = {side: _side_metrics(ref, side, run, advance) for side in ref.sides}
    overall = worst_side(per_side)
    overall["samples"] = ref.index["samples"]
    return overall


def worst_side(per_side: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures of every padding side (``per_side``, made JSON-safe in place) as one: each
    figure its worst side's, non-finite outputs summed, and ``per_side`` kept beside them."""
    overall: dict[str, Any] = {}
    for name in next(iter(per_side.values())):
        if name == "error_quantiles":
            continue
        values = [m[name] for m in per_side.values()]
        if name == "nonfinite_outputs":
            overall[name] = sum(values)
        elif not all(math.isfinite(v) for v in values):
            # A NaN or infinite figure is the worst possible result: recorded as "no figure"
            # (JSON has no NaN), and every check on it fails; nonfinite_outputs says why.
            overall[name] = None
        else:
            overall[name] = max(values) if name in _HIGHER_IS_WORSE else min(values)
    for figures in per_side.values():
        for name, value in figures.items():
            if isinstance(value, float) and not math.isfinite(value):
                figures[name] = None
    # The task metric's loss against PyTorch's on the same texts and side: the worst side's
    # drop. (task_metric and reference_task_metric above are each their worst side's, which
    # may be two different sides: PyTorch itself may score lower on left-padded text.)
    drops = [
        m["reference_task_metric"] - m["task_metric"]
        for m in per_side.values()
        if m.get("task_metric") is not None and m.get("reference_task_metric") is not None
    ]
    if drops:
        overall["task_metric_drop"] = max(drops)
    # The distribution of the side whose median text error is the larger.
    sides = [m["error_quantiles"] for m in per_side.values()]
    overall["error_quantiles"] = (
        None if any(q is None for q in sides) else max(sides, key=lambda q: q[len(q) // 2])
    )
    overall["error_kind"] = "cosine_distance" if "mean_cosine" in overall else "max_abs_error"
    overall["per_side"] = per_side
    return overall


class VerifyConfig(StageConfig):
    variant: str
    target: str
    precision: str
    session_optimization: str
    threads: int
    #: ort-openvino with static_shapes: the (batch, sequence) shapes the model is compiled for.
    shapes: tuple[tuple[int, int], ...] = ()


class VerifyStage(Stage[VerifyConfig]):
    name = "verify"
    # ONNX Runtime picks kernels by CPU features (e.g. VNNI for INT8): results are per machine.
    facets = ("versions", "hardware")
    # 2: non-finite outputs counted; 3: per-text error quantiles; 4: task_metric_drop
    version = 4

    def key_config(self) -> dict[str, Any]:
        config = super().key_config()
        if not config["shapes"]:
            del config["shapes"]  # dynamic shapes: the key of builds before the option
        return config

    def key_facets(self) -> tuple[str, ...]:
        # A GPU target's results depend on the GPU and its driver too.
        return (*self.facets, "gpu") if self.config.target in GPU_TARGETS else self.facets

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        cfg = self.config
        ref = ReferenceData.of(inputs["reference"])
        folder = inputs["model"].path
        runner = runner_for(
            cfg.target,
            folder,
            cfg.threads,
            cfg.session_optimization,
            cfg.variant,
            cfg.precision,
            cfg.shapes,
        )
        output = ref.index["output"]
        stats = compare_to_reference(
            ref, lambda feed: runner.run(feed)[output], ctx.progress, f"verify {cfg.variant}"
        )
        stats["size_bytes"] = model_size(cfg.target, folder)
        return StageResult(stats=stats)

    def describe(self) -> str:
        return f"verify {self.config.variant} on {self.config.target}"
