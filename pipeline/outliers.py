"""Outlier input channels multiplied in float beside the INT8 product (dynamic INT8).

Dynamic INT8 quantizes a MatMul's input with one scale per call, set by its largest magnitude.
A few input channels of trained Transformers run many times larger than the rest: BERT's
LayerNorm and GELU outputs (up to 20x the median channel on all-MiniLM-L6-v2), and Llama's
down-projection inputs (nearly 800x on SmolLM2-135M). They set the scale, and every other
channel is left with a handful of levels. LLM.int8() (Dettmers et al., 2022) splits those
channels out: ``X @ W = X_rest @ W_rest + X_out @ W_out``, the first product in INT8 and the
second, a few channels wide, in float.

ONNX Runtime has no such kernel, so the split is written in standard ops around each MatMul
before the dynamic quantizer runs: ``Mul(X, mask)`` zeroes the outlier channels (the quantizer
then measures the range of the others only), ``Gather`` picks them, a narrow float MatMul
multiplies them by their weight rows and an ``Add`` joins both products. In float the split
graph computes what the original does. The channels are chosen once, from per-channel ranges
measured on calibration data (:func:`channel_ranges`): those whose largest magnitude exceeds
``threshold`` times the median channel's, at most ``max_channels`` per input, largest first.

Ranges are keyed by the MatMul's weight (initializer) name, so ranges measured on one graph
apply to another holding the same weights under the same names (a decoder's unfused prefill and
decode graphs; fusion that packs Q, K and V gives each graph its own packed weight names).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Name marker of the nodes the split adds (the float MatMuls must not be quantized).
MARKER = ".outliers"
#: Name marker of the Muls smoothing adds.
SMOOTH = ".smooth"
#: Smoothing's default alpha (and the budget's smooth remedy's), the best measured on
#: all-MiniLM-L6-v2 (see below).
SMOOTH_ALPHA = 0.75


@dataclass(frozen=True)
class OutlierSettings:
    #: A channel is an outlier when its largest magnitude exceeds this multiple of the median
    #: channel's largest magnitude.
    threshold: float = 3.0
    #: At most this many channels per input (the largest), so the float product stays narrow.
    max_channels: int = 8


def weight_matmul_inputs(model: Any) -> dict[str, list[str]]:
    """Weight (initializer) name -> the activations it multiplies (several where layers share
    their weights, as ALBERT's do), for every MatMul whose second input is a constant 2-D weight."""
    constants = {init.name: init for init in model.graph.initializer}
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else ""
        if weight in constants and len(constants[weight].dims) == 2:
            found.setdefault(weight, [])
            if node.input[0] not in found[weight]:
                found[weight].append(node.input[0])
    return found


def channel_ranges(
    model_path: Path, feeds: Iterable[Mapping[str, np.ndarray]], threads: int = 1
) -> dict[str, np.ndarray]:
    """Weight name -> the largest magnitude of each input channel of its MatMul over ``feeds``.

    The graph runs once per feed with its MatMul inputs as extra outputs; only the running
    per-channel maxima are kept, so memory stays one batch of activations.
    """
    import onnx
    import onnxruntime as ort

    from pipeline.errors import PreconditionError
    from pipeline.stages.export import _TWO_GB

    # Loaded whole (external weights included) and given to the session as bytes, so nothing
    # is written beside the source graph.
    model = onnx.load(str(model_path))
    inputs = weight_matmul_inputs(model)
    tensors = sorted({t for names in inputs.values() for t in names})
    present = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in present:
            # Untyped: ONNX Runtime takes the value's own type (float32, float16...).
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    if model.ByteSize() >= _TWO_GB:
        raise PreconditionError(
            f"{model_path.name} is over 2 GB; its channel ranges cannot be measured in memory",
            "leave quantize.outliers unset for this model",
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    del model
    names = {i.name for i in session.get_inputs()}
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = session.run(tensors, {k: v for k, v in feed.items() if k in names})
        for name, value in zip(tensors, values, strict=True):
            magnitude = np.abs(np.asarray(value, dtype=np.float32))
            top = magnitude.reshape(-1, magnitude.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima[name], top) if name in maxima else top
    # A weight shared by several MatMuls: the largest over every input it multiplies.
    return {
        weight: np.max([maxima[t] for t in names], axis=0)
        for weight, names in inputs.items()
        if all(t in maxima for t in names)
    }


def standout(top: np.ndarray) -> float:
    """How far an input's largest channel stands out: its maximum over the median channel's
    (0 for an input whose median channel is all zeros)."""
    median = float(np.median(top))
    return float(top.max()) / median if median > 0 else 0.0


def choose_channels(
    ranges: Mapping[str, np.ndarray], settings: OutlierSettings
) -> dict[str, list[int]]:
    """Weight name -> its outlier input channels (sorted); weights without any are left out."""
    chosen = {}
    for weight, top in ranges.items():
        median = float(np.median(top))
        if median <= 0:
            continue
        order = np.argsort(-top, kind="stable")[: settings.max_channels]
        picked = sorted(int(i) for i in order if top[i] > settings.threshold * median)
        if picked:
            chosen[weight] = picked
    return dict(sorted(chosen.items()))


def split_outliers(model: Any, channels: Mapping[str, list[int]]) -> list[str]:
    """Rewrite each MatMul whose weight is in ``channels`` (in place); returns the names of the
    float MatMuls added, which the quantizer must leave alone.

    An input split alike for several MatMuls (Q, K and V) gets one mask and one Gather. A weight
    shared by several MatMuls is zeroed once and each gets its own copy of the outlier rows.
    """
    from onnx import helper, numpy_helper

    constants = {init.name: init for init in model.graph.initializer}
    # The weights as they were: a shared weight's rows are read before any zeroing.
    original = {w: numpy_helper.to_array(constants[w]) for w in channels if w in constants}
    splits: dict[tuple[str, tuple[int, ...]], tuple[str, str]] = {}
    added: list[str] = []
    nodes = []
    for node in model.graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else ""
        if weight not in original:
            nodes.append(node)
            continue
        picked = list(channels[weight])
        source = node.input[0]
        stem = node.name or node.output[0]
        if (source, tuple(picked)) not in splits:
            key = f"{source}{MARKER}" + (f".{len(splits)}" if splits else "")
            mask = np.ones(original[weight].shape[0], dtype=original[weight].dtype)
            mask[picked] = 0
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(mask, f"{key}.mask"),
                    numpy_helper.from_array(np.asarray(picked, dtype=np.int64), f"{key}.index"),
                ]
            )
            nodes.append(
                helper.make_node(
                    "Mul", [source, f"{key}.mask"], [f"{key}.rest"], name=f"{key}.mask"
                )
            )
            nodes.append(
                helper.make_node(
                    "Gather",
                    [source, f"{key}.index"],
                    [f"{key}.picked"],
                    name=f"{key}.gather",
                    axis=-1,
                )
            )
            splits[(source, tuple(picked))] = (f"{key}.rest", f"{key}.picked")
        rest, outliers = splits[(source, tuple(picked))]
        # The rows of the outlier channels multiply zeros in the INT8 product: zeroed, so
        # they do not widen the weights' per-channel scales either.
        matrix = original[weight].copy()
        matrix[picked] = 0
        constants[weight].CopyFrom(numpy_helper.from_array(matrix, weight))
        model.graph.initializer.append(
            numpy_helper.from_array(original[weight][picked], f"{stem}{MARKER}.weight")
        )
        output = node.output[0]
        nodes.append(helper.make_node("MatMul", [rest, weight], [f"{output}.int8"], name=node.name))
        nodes.append(
            helper.make_node(
                "MatMul",
                [outliers, f"{stem}{MARKER}.weight"],
                [f"{output}{MARKER}"],
                name=f"{stem}{MARKER}",
            )
        )
        nodes.append(
            helper.make_node(
                "Add", [f"{output}.int8", f"{output}{MARKER}"], [output], name=f"{stem}{MARKER}.add"
            )
        )
        added.append(f"{stem}{MARKER}")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return added


def split_channels(model: Any, channels: Mapping[str, list[int]]) -> tuple[int, int]:
    """(inputs, channels): the distinct activations ``channels`` splits in ``model`` and the
    distinct channels of theirs (Q, K and V sharing an input count once)."""
    pairs = {
        (source, c)
        for weight, names in weight_matmul_inputs(model).items()
        if weight in channels
        for source in names
        for c in channels[weight]
    }
    return len({source for source, _ in pairs}), len(pairs)


def ranges_to_json(ranges: Mapping[str, np.ndarray]) -> str:
    """Per-channel ranges as sorted JSON (float32 values, so the same data gives the same bytes)."""
    data = {k: [float(np.float32(v)) for v in ranges[k]] for k in sorted(ranges)}
    return json.dumps(data, indent=1) + "\n"


def ranges_from_json(text: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in json.loads(text).items()}


# --- Smoothing (SmoothQuant-style): the outliers' scale moved into the weights -----------------
#
# ``X @ W = (X / s) @ (diag(s) W)``: dividing each input channel by s_k and multiplying its weight
# row by s_k leaves the product as it was in float, but flattens the input's channel ranges
# (Xiao et al., 2023), so dynamic INT8's one activation scale per call fits more of them. With
# ``s = max|X|^alpha / max|W_row|^(1 - alpha)`` alpha sets how much of the spread moves into the
# weights, which are quantized per output column and take it better. ``1/s`` is one elementwise
# Mul on the input; the weight rows are scaled ahead of time. All-MiniLM-L6-v2 (dynamic INT8,
# every input smoothed; mean cosine / nearest-neighbour agreement): alpha 0.5 0.982 / 0.79,
# 0.65 0.9957 / 0.906, 0.75 0.9960 / 0.918, 0.85 0.9942 / 0.902, 1.0 0.9905 / 0.879; none 0.9897 /
# 0.867. Low alphas load the weight rows with the spread and lose.


def _input_groups(model: Any) -> list[tuple[list[str], list[str]]]:
    """(inputs, weights) groups that must share one scale: an input's weights (Q, K and V read
    one input) and, through a weight several MatMuls share, those MatMuls' inputs."""
    inputs = weight_matmul_inputs(model)
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for weight, sources in inputs.items():
        for source in sources:
            parent[root(f"x:{source}")] = root(f"w:{weight}")
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for weight, sources in inputs.items():
        members = groups.setdefault(root(f"w:{weight}"), ([], []))
        members[1].append(weight)
        members[0].extend(s for s in sources if s not in members[0])
    return list(groups.values())


def _read_elsewhere(model: Any) -> set[str]:
    """Names read other than as a MatMul's weight. A weight some other node also reads (an
    embedding table a tied head multiplies by) must stay as it is: scaling or zeroing its rows
    would change that node's result too."""
    return {
        name
        for node in model.graph.node
        for i, name in enumerate(node.input)
        if not (node.op_type == "MatMul" and i == 1)
    } | {o.name for o in model.graph.output}


def smoothing_scales(
    model: Any, ranges: Mapping[str, np.ndarray], alpha: float
) -> dict[str, np.ndarray]:
    """Weight name -> the per-input-channel scale ``s`` of its group (see above).

    A channel that never moved on the calibration data, or whose weight row is all zeros, keeps
    scale 1 (there is nothing to balance).
    """
    from onnx import numpy_helper

    constants = {init.name: init for init in model.graph.initializer}
    elsewhere = _read_elsewhere(model)
    scales: dict[str, np.ndarray] = {}
    for _, weights in _input_groups(model):
        if not all(w in ranges and w not in elsewhere for w in weights):
            continue
        activation = np.max([ranges[w] for w in weights], axis=0).astype(np.float64)
        rows = np.max(
            [np.abs(numpy_helper.to_array(constants[w])).max(axis=1) for w in weights], axis=0
        ).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = activation**alpha / rows ** (1.0 - alpha)
        scale = np.where((activation > 0) & (rows > 0) & np.isfinite(scale), scale, 1.0)
        for weight in weights:
            scales[weight] = scale.astype(np.float32)
    return scales


def smooth_inputs(model: Any, scales: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """Smooth (in place) every MatMul whose weight has a scale: its weight rows times ``s``, its
    input through one ``Mul(X, 1/s)`` per input (shared by Q, K and V). Returns (inputs, MatMuls).
    """
    from onnx import helper, numpy_helper

    constants = {init.name: init for init in model.graph.initializer}
    for weight, scale in scales.items():
        matrix = numpy_helper.to_array(constants[weight])
        scaled = (matrix * scale[:, None].astype(matrix.dtype)).astype(matrix.dtype)
        constants[weight].CopyFrom(numpy_helper.from_array(scaled, weight))
    smoothed: dict[str, str] = {}
    matmuls = 0
    nodes = []
    for node in model.graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else ""
        if weight in scales:
            source = node.input[0]
            if source not in smoothed:
                name = f"{source}{SMOOTH}"
                inverse = (1.0 / scales[weight]).astype(np.float32)
                model.graph.initializer.append(numpy_helper.from_array(inverse, f"{name}.scale"))
                # Before its first reader, so the graph stays in topological order.
                nodes.append(helper.make_node("Mul", [source, f"{name}.scale"], [name], name=name))
                smoothed[source] = name
            node.input[0] = smoothed[source]
            matmuls += 1
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(smoothed), matmuls


def plan_channels(
    model: Any,
    ranges: Mapping[str, np.ndarray],
    outliers: OutlierSettings | None,
    alpha: float | None,
    excluded: Iterable[str] = (),
) -> tuple[dict[str, list[int]], dict[str, np.ndarray]]:
    """Which weights' inputs are split (weight -> channels) and which smoothed (weight -> scale).

    Both asked for: an input is smoothed unless, smoothed, it would still have channels over
    the threshold (smoothing cannot flatten it: on all-MiniLM-L6-v2 the GELU outputs feeding
    the FFN down-projections); those inputs are split instead, at their own channels. So the
    split, which costs a narrow float product and an Add per MatMul, is paid only where
    smoothing, which costs one Mul, does not do. Weights in ``excluded`` (kept in float) get
    neither.
    """
    skip = set(excluded) | _read_elsewhere(model)
    scales = smoothing_scales(model, ranges, alpha) if alpha is not None else {}
    chosen: dict[str, list[int]] = {}
    if outliers is not None:
        chosen = choose_channels(ranges, outliers)
        if scales:
            flattened = {w: ranges[w] / scales[w] for w in scales}
            still = choose_channels(flattened, outliers)
            chosen = {w: c for w, c in chosen.items() if w in still or w not in scales}
        chosen = {w: c for w, c in chosen.items() if w not in skip}
    # A group with a split weight is not smoothed (its input goes to the split as it is).
    split_groups = [
        weights for _, weights in _input_groups(model) if any(w in chosen for w in weights)
    ]
    unsmoothed = skip | {w for weights in split_groups for w in weights}
    return chosen, {w: s for w, s in scales.items() if w not in unsmoothed}
