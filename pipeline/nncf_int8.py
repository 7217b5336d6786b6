"""Static INT8 through NNCF, OpenVINO's post-training quantizer (``quantize.quantizer: nncf``).

NNCF quantizes the ONNX graph itself (its ONNX backend; statistics are collected with ONNX
Runtime) and writes standard QuantizeLinear/DequantizeLinear pairs, which OpenVINO's provider
runs on integer kernels. Its transformer preset does what ONNX Runtime's QDQ quantizer does not:
SmoothQuant-style scaling of MatMul inputs, ranges per activation with the symmetry each one
needs (asymmetric after LayerNorm, symmetric elsewhere), per-channel weights, and bias
correction. On all-MiniLM-L6-v2, on OpenVINO (MiniLM's evaluation texts, worst padding side):

    ONNX Runtime QDQ, MinMax, symmetric     mean cosine 0.786, agreement 0.42
    NNCF, transformer preset, 512 texts     mean cosine 0.9956, agreement 0.92, 23.7 ms b8s128
                                            (bf16 on the same CPU: 25.5 ms)

Three steps, so that the accuracy budget can keep nodes in float without quantizing again:

* :func:`quantize` asks NNCF for a fake-quantized graph: the (smoothed) weights stay float
  behind their QuantizeLinear, so every product's float operands are still in the graph;
* :func:`keep_float` points chosen nodes back at those float operands. Smoothing keeps the
  float product exact (its Mul and the weight rows cancel), so such a node computes in float
  what the float model did, and one NNCF run serves every candidate of the search. NNCF also
  stores the embedding tables in INT8 (weight-only, read by Gather): they are candidates too
  (on MiniLM, keeping them float moves agreement from 0.918 to 0.934);
* :func:`fold_weights` stores each weight's INT8 values (what its QuantizeLinear computes) as
  an initializer: the deployable file, a quarter of the float weights' bytes.

Nodes the recipe excludes are NNCF's ignored scope (never smoothed nor quantized).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

#: What NNCF is asked for, recorded in the stage stats and the report.
PRESET = "transformer"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """NNCF logs each algorithm at INFO and draws progress bars on stdout; the stage shows its
    own progress, so they are kept out of the build's output."""
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        nncf_log.setLevel(level)


def quantize(
    model: Any, feeds: Sequence[Mapping[str, np.ndarray]], ignored: Sequence[str] = ()
) -> Any:
    """NNCF's INT8 of ``model`` (an ``onnx.ModelProto``, not changed) calibrated on ``feeds``,
    with the weights left float behind their QuantizeLinear (see :func:`fold_weights`)."""
    import nncf
    from nncf.onnx.quantization.backend_parameters import BackendParameters
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    advanced = AdvancedQuantizationParameters(
        backend_params={BackendParameters.COMPRESS_WEIGHTS: False}
    )
    scope = nncf.IgnoredScope(names=list(ignored), validate=True) if ignored else None
    with _quiet():
        return nncf.quantize(
            model,
            nncf.Dataset(list(feeds)),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),
            ignored_scope=scope,
            advanced_parameters=advanced,
        )


def _producers(graph: Any) -> dict[str, Any]:
    return {output: node for node in graph.node for output in node.output}


def _float_operand(name: str, producers: Mapping[str, Any]) -> str:
    """The float tensor behind a DequantizeLinear(QuantizeLinear(x)) pair, else ``name``."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return name
    ql = producers.get(dq.input[0])
    if ql is None or ql.op_type != "QuantizeLinear":
        return name
    return str(ql.input[0])


def quantized_nodes(model: Any) -> list[str]:
    """Nodes of a fake-quantized graph that read a Q/DQ pair: weight MatMuls, and the embedding
    tables NNCF quantizes weight-only (Gather)."""
    producers = _producers(model.graph)
    return [
        node.name
        for node in model.graph.node
        if node.op_type in ("MatMul", "Gather")
        and any(_float_operand(i, producers) != i for i in node.input)
    ]


def keep_float(model: Any, nodes: Sequence[str]) -> Any:
    """A copy of the fake-quantized ``model`` whose ``nodes`` (MatMuls, Gathers) read their float
    operands (the pairs no other node reads are removed)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    wanted = set(nodes)
    producers = _producers(graph)
    found = set()
    for node in graph.node:
        if node.name in wanted:
            for i in range(len(node.input)):
                node.input[i] = _float_operand(node.input[i], producers)
            found.add(node.name)
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"no node named {missing[:3]} in the quantized graph")
    _remove_dead(copy)
    return copy


def _remove_dead(model: Any) -> None:
    """Drop nodes whose outputs nobody reads, and initializers no node reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | outputs
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def _quantized(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero), per ``axis`` when the
    scale is a vector."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    info = np.iinfo(zero.dtype)
    values = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zero.astype(np.int32)
    return np.clip(values, info.min, info.max).astype(zero.dtype)


def fold_weights(model: Any) -> Any:
    """A copy of ``model`` with every QuantizeLinear of a constant replaced by its result."""
    import onnx
    from onnx import numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    constants = {i.name: i for i in graph.initializer}
    folded = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in constants:
            continue
        if len(node.input) < 3 or not all(name in constants for name in node.input[1:3]):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        x, scale, zero = (numpy_helper.to_array(constants[name]) for name in node.input[:3])
        q = _quantized(x, scale, zero, axis if axis >= 0 else axis + x.ndim)
        graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    _remove_dead(copy)
    return copy
