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
apply to another holding the same weights (a decoder's prefill and decode graphs).
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
