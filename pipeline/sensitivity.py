"""Per-node sensitivity: how much error quantizing each weight MatMul adds on its own.

Two measures, a cheap local one and an end-to-end one.

**Local (SQNR).**
For every MatMul with a constant weight, the float graph is run on real batches with the
MatMul's activation input exposed as an extra output. Each node's output is then computed
twice in NumPy, ``X @ W`` and ``Q(X) @ Q(W)`` with the same quantization the variant uses
(weights symmetric INT8 per channel or per tensor; activations per batch for dynamic INT8, or
from the calibration table for static; for a decoder's weight-only variants, MatMulNBits' weight
blocks and, with int8 products, its 8-bit input blocks), over real (non-padding) tokens only.
Dynamic INT8 takes each batch's range over its real tokens, where ONNX Runtime takes each call's
over the whole tensor. The result is the
node's signal-to-quantization-noise ratio, SQNR = 10 log10(|XW|^2 / |XW - Q(X)Q(W)|^2) in dB:
low means the node loses much when quantized.

One forward pass for all nodes, memory bounded by one batch. ONNX Runtime's
``qdq_loss_debug`` compares whole QDQ models tensor by tensor, which mixes each node's own
error with what it inherits from upstream, and has no dynamic-quantization counterpart.

**Output error.** The model quantized with only that node in INT8, run on a few reference
batches: the relative squared error of the model's output against PyTorch's. It costs one
quantization and a few batches per node, and it is what the accuracy budget ranks by, because
local SQNR misjudges which nodes matter: on MiniLM the three FFN down-projections of layers
0-2 cause the most output error (0.0024, 0.0011 and 0.0011 of mean cosine each) but rank
only 10th-20th by SQNR (30-35 dB, against 25 dB for the FFN up-projections). The single-node
losses add up: their sum (0.0102) matches the loss with every node quantized (0.0102).

Node names map back to the PyTorch module (``encoder.layer.3.output.dense``) through the
exporter's ``pkg.torch.onnx.name_scopes`` metadata.
"""

from __future__ import annotations

import ast
import math
import tempfile
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.calibration.table import CalibrationTable


@dataclass(frozen=True)
class NodeSensitivity:
    node: str
    #: The PyTorch module the node came from, when the exporter recorded it.
    module: str | None
    sqnr_db: float

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "module": self.module, "sqnr_db": round(self.sqnr_db, 2)}


def module_name(node: Any) -> str | None:
    """The PyTorch module an ONNX node (onnx or onnx_ir) came from (without the export
    wrapper's ``model.``).

    The exporter's scopes run from the root module to the call: ``['', 'model', ...,
    'model.encoder.layer.0.intermediate.dense', 'linear_4']``; the module is the one before
    the call.
    """
    props = node.metadata_props  # onnx: a list of entries; onnx_ir: a dict
    entries = props.items() if isinstance(props, dict) else ((p.key, p.value) for p in props)
    for key, text in entries:
        if key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str):
                return scopes[-2].removeprefix("model.") or None
    return None


def _quantize_weight(weight: np.ndarray, per_channel: bool, reduce_range: bool) -> np.ndarray:
    """Symmetric signed weights, one scale per output column (or one for the tensor)."""
    top = 63.0 if reduce_range else 127.0
    amax = np.abs(weight).max(axis=0, keepdims=True) if per_channel else np.abs(weight).max()
    scale = np.where(amax > 0, amax / top, 1.0)
    return np.clip(np.round(weight / scale), -top, top) * scale


def _quantize_activation(x: np.ndarray, low: float, high: float, symmetric: bool) -> np.ndarray:
    """Per-tensor activations over [low, high] (which always includes 0)."""
    low, high = min(low, 0.0), max(high, 0.0)
    if symmetric:
        amax = max(-low, high)
        scale = amax / 127.0 if amax > 0 else 1.0
        return np.clip(np.round(x / scale), -127, 127) * scale
    scale = (high - low) / 255.0 if high > low else 1.0
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


@dataclass(frozen=True)
class Blocks:
    """Block-wise quantization (ONNX Runtime's MatMulNBits): each weight column in symmetric
    blocks of ``size`` input channels at ``bits`` (:func:`quantize_blocks`); with ``inputs``,
    the activations too, each row in symmetric 8-bit blocks of ``size`` (its int8-product path,
    accuracy level 4: :func:`int8_input_blocks`)."""

    bits: int
    size: int
    inputs: bool


def _blocked(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` as blocks of ``size`` along its last axis (the last block padded with zeros)."""
    padded = -x.shape[-1] % size
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded)]).reshape(*x.shape[:-1], -1, size)


def _unblocked(blocks: np.ndarray, width: int) -> np.ndarray:
    return blocks.reshape(*blocks.shape[:-2], -1)[..., :width]


def quantize_blocks(x: np.ndarray, bits: int, size: int) -> np.ndarray:
    """``x`` rounded as ONNX Runtime's MatMulNBits quantizer rounds symmetric weight blocks,
    along its last axis, back in float: each block's largest-magnitude value, sign included,
    maps to the lowest level (-8 at 4 bits, -128 at 8) and the rest to [-8, 7] ([-128, 127])."""
    levels = 2.0 ** (bits - 1)
    blocks = _blocked(x, size)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)
    scale = np.where(extreme != 0, extreme / -levels, 1.0)
    rounded = np.clip(np.round(blocks / scale), -levels, levels - 1) * scale
    return _unblocked(rounded, x.shape[-1])


def int8_input_blocks(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` rounded as MatMulNBits' int8 products (accuracy level 4) round its input, back in
    float: symmetric 8-bit blocks along the last axis, each block's largest magnitude at 127."""
    blocks = _blocked(x, size)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return _unblocked(np.clip(np.round(blocks / scale), -127, 127) * scale, x.shape[-1])


def matmul_sensitivity(
    model_path: Path | Any,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    per_channel: bool,
    reduce_range: bool,
    table: CalibrationTable | None = None,
    threads: int = 1,
    blocks: Blocks | None = None,
    skip: Collection[str] = (),
) -> list[NodeSensitivity]:
    """SQNR of each weight MatMul (but those named in ``skip``), most sensitive (lowest SQNR)
    first.

    ``table`` None means dynamic quantization (each batch's own activation range); ``blocks``
    block-wise weights instead of per-channel ones (``per_channel``, ``reduce_range`` and
    ``table`` then do not apply).
    """
    import onnx
    from onnx import numpy_helper

    from pipeline.backends.onnxruntime_backend import OrtRunner
    from pipeline.stages.export import load_onnx

    # A path, or an ``onnx.ModelProto`` already in memory (changed in place).
    model = load_onnx(model_path) if isinstance(model_path, Path) else model_path
    weights = {init.name: init for init in model.graph.initializer}
    nodes = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and len(n.input) == 2
        and n.input[1] in weights
        and n.name not in skip
    ]
    if not nodes:
        return []
    exposed = sorted({n.input[0] for n in nodes})
    present = {o.name for o in model.graph.output}
    for name in exposed:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    # Held in float32 (a decoder's weights twice over), multiplied in float64.
    float_w = {n.name: numpy_helper.to_array(weights[n.input[1]]).astype(np.float32) for n in nodes}
    quantized_w = {
        # Weights are [in, out]: a block runs along the input channels of one column.
        name: (
            _quantize_weight(weight.astype(np.float64), per_channel, reduce_range)
            if blocks is None
            else quantize_blocks(weight.T.astype(np.float64), blocks.bits, blocks.size).T
        ).astype(np.float32)
        for name, weight in float_w.items()
    }
    signal = dict.fromkeys(quantized_w, 0.0)
    noise = dict.fromkeys(quantized_w, 0.0)
    with tempfile.TemporaryDirectory(prefix="sensitivity-") as work:
        path = Path(work) / "exposed.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="exposed.onnx.data")
        runner = OrtRunner(path, threads, "disabled", name="sensitivity")
        for feed in feeds:
            outputs = runner.run(feed)
            mask = feed.get("attention_mask")
            for node in nodes:
                x = np.asarray(outputs[node.input[0]], dtype=np.float64)
                if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                    x = x[mask.astype(bool)]
                elif mask is not None and x.ndim == 2 and x.shape[0] == mask.size:
                    # Flattened [batch x sequence, features] (GPT-2's projections).
                    x = x[mask.reshape(-1).astype(bool)]
                x = x.reshape(-1, x.shape[-1])
                if blocks is not None:
                    rounded = int8_input_blocks(x, blocks.size) if blocks.inputs else x
                elif table is None:
                    rounded = _quantize_activation(x, float(x.min()), float(x.max()), False)
                else:
                    low, high = table.ranges.get(node.input[0], (float(x.min()), float(x.max())))
                    rounded = _quantize_activation(x, low, high, table.symmetric)
                exact = x @ float_w[node.name].astype(np.float64)
                approx = rounded @ quantized_w[node.name].astype(np.float64)
                signal[node.name] += float(np.square(exact).sum())
                noise[node.name] += float(np.square(exact - approx).sum())
    result = [
        NodeSensitivity(
            node.name,
            module_name(node),
            10 * math.log10(signal[node.name] / noise[node.name])
            if noise[node.name] > 0 and signal[node.name] > 0
            else math.inf,
        )
        for node in nodes
    ]
    return sorted(result, key=lambda s: (s.sqnr_db, s.node))


def output_error(
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    batches: Sequence[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]],
) -> float:
    """Relative squared error of ``run``'s output against the reference, over real tokens.

    ``batches`` are (feed, reference output, attention mask); outputs without a sequence axis
    (classification logits) are compared whole.
    """
    signal = noise = 0.0
    for feed, reference, mask in batches:
        output = np.asarray(run(feed), dtype=np.float64)
        expected = reference.astype(np.float64)
        if expected.ndim >= 3 and expected.shape[:2] == mask.shape:
            keep = mask.astype(bool)
            output, expected = output[keep], expected[keep]
        if not np.all(np.isfinite(output)):
            return math.inf
        signal += float(np.square(expected).sum())
        noise += float(np.square(output - expected).sum())
    return noise / signal if signal > 0 else math.inf


def rank_by_output_error(
    nodes: Sequence[str], error_with_only: Callable[[str], float]
) -> list[tuple[str, float]]:
    """(node, output error with only that node quantized), largest error first."""
    errors = [(node, error_with_only(node)) for node in nodes]
    return sorted(errors, key=lambda pair: (-pair[1], pair[0]))
