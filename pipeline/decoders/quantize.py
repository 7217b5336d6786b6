"""Weight quantization of a decoder's prefill and decode graphs.

* ``int8``: ONNX Runtime's dynamic quantization (INT8 weights per output channel, activations
  quantized per call) of every MatMul with a constant weight;
* ``int8-weight`` and ``int4``: ONNX Runtime's ``MatMulNBits`` weight-only quantization
  (round-to-nearest, symmetric, blocks of ``block_size`` along the input dimension) with 8- or
  4-bit weights; activations stay float, which is what keeps small Llama-family models accurate
  (their activations have outlier channels that a per-call INT8 activation scale cannot hold).

Both quantizers act on ``MatMul`` only, and GPT-2's exported projections are ``Gemm`` nodes
(its Conv1D is ``addmm``); those are first rewritten as ``MatMul`` + ``Add`` when they are a plain
``A @ B + C`` (no transposes, alpha = beta = 1), which is exact. The two graphs are quantized
independently with the same settings; their weights are the same, so their errors are too.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any, Literal

from pipeline.decoders.export import DECODE, PREFILL, copy_companions, share_weights
from pipeline.environment import int8_products_saturate
from pipeline.errors import PreconditionError

log = logging.getLogger(__name__)


def gemm_to_matmul(model: Any) -> int:
    """Rewrite ``Gemm(A, B, C)`` with a constant B, no transposes and unit scales as
    ``Add(MatMul(A, B), C)``, in place. Returns how many were rewritten."""
    from onnx import helper

    constants = {i.name for i in model.graph.initializer}
    nodes = []
    rewritten = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            node.op_type == "Gemm"
            and node.input[1] in constants
            and attrs.get("transA", 0) == 0
            and attrs.get("transB", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
        )
        if not plain:
            nodes.append(node)
            continue
        product = f"{node.output[0]}_matmul"
        matmul = helper.make_node(
            "MatMul", [node.input[0], node.input[1]], [product], name=f"{node.name}_MatMul"
        )
        # The exporter's scopes: the MatMul keeps its module name (quantize.exclude, reports).
        matmul.metadata_props.extend(node.metadata_props)
        nodes.append(matmul)
        if len(node.input) > 2 and node.input[2]:
            nodes.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"
                )
            )
        else:
            nodes[-1].output[0] = node.output[0]
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def _transposed_constants(model: Any) -> dict[str, str]:
    """Output -> initializer of each 2-D ``Transpose`` of an initializer (a tied LM head reads
    the embedding table this way: ``x @ Transpose(embed_tokens.weight)``)."""
    from onnx import helper

    shapes = {i.name: len(i.dims) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "Transpose" or shapes.get(node.input[0]) != 2:
            continue
        perm = next(
            (helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), None
        )
        if perm is None or list(perm) == [1, 0]:
            out[node.output[0]] = node.input[0]
    return out


def _weight_matmuls(model: Any) -> list[Any]:
    """MatMuls whose weight is a constant, or a transposed constant (a tied LM head)."""
    constants = {i.name for i in model.graph.initializer} | set(_transposed_constants(model))
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]


def untie(model: Any, nodes: list[Any]) -> int:
    """Give each of ``nodes`` that multiplies by a transposed constant its own transposed copy.

    Quantizers take only a constant weight: a tied LM head (the embedding table, transposed at
    run time) would otherwise stay float, and it is the largest matrix of a small model. The
    embedding lookup keeps the float table. Returns how many were untied.
    """
    from onnx import numpy_helper

    transposed = _transposed_constants(model)
    weights = {i.name: i for i in model.graph.initializer}
    made: dict[str, str] = {}
    for node in nodes:
        source = transposed.get(node.input[1])
        if source is None:
            continue
        if source not in made:
            name = f"{source}.transposed"
            array = numpy_helper.to_array(weights[source]).T.copy()
            model.graph.initializer.append(numpy_helper.from_array(array, name))
            made[source] = name
        node.input[1] = made[source]
    used = {i for n in model.graph.node for i in n.input}
    keep = [
        n
        for n in model.graph.node
        if not (n.op_type == "Transpose" and n.output[0] in transposed and n.output[0] not in used)
    ]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return sum(1 for n in nodes if n.input[1] in made.values())


def matches(pattern: str, node: Any, module: str) -> bool:
    """Whether ``pattern`` names ``node`` (its ONNX name) or its PyTorch ``module``."""
    # PyTorch names the decoder body ``model.layers.N...``; either spelling is taken.
    names = (module, f"model.{module}") if module else ()
    return node.name == pattern or any(fnmatch.fnmatchcase(n, pattern) for n in names)


def excluded(nodes: list[Any], patterns: tuple[str, ...]) -> tuple[dict[str, str], set[str]]:
    """(node name -> the module (or node) name that matched one of ``patterns``, the
    patterns that matched nothing).

    A pattern is a PyTorch module name or a shell pattern of one (``lm_head``,
    ``*.down_proj``, ``layers.0.*`` or ``model.layers.0.*``; the module is read from the
    exporter's scope metadata), or an ONNX node name.
    """
    from pipeline.sensitivity import module_name

    kept = {}
    unused = set(patterns)
    for node in nodes:
        module = module_name(node) or ""
        hits = {p for p in patterns if matches(p, node, module)}
        if hits:
            kept[node.name] = module or node.name
            unused -= hits
    return kept, unused


Method = Literal["int8", "int8-weight", "int4"]
METHODS: tuple[str, ...] = ("int8", "int8-weight", "int4")


#: MatMulNBits' ``accuracy_level`` per compute type: 4 quantizes activations to INT8 per block at
#: run time (the CPU's integer dot products); 0 leaves the choice to the kernel (float).
ACCURACY_LEVEL = {"int8": 4, "float": 0}


def _quantize_graph(
    source: Path,
    target: Path,
    method: Method,
    block_size: int,
    exclude: tuple[str, ...],
    compute: str,
    keep_grid: bool,
    fitted: dict[str, Any],
    reduce_range: bool = False,
) -> dict[str, Any]:
    """Quantize one graph; ``fitted`` remembers weight grids across the two graphs."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pipeline.stages.export import load_onnx
    from pipeline.stages.quantize import quiet_quantizer

    model = load_onnx(source)
    gemms = gemm_to_matmul(model)
    matmuls = _weight_matmuls(model)
    if not matmuls:
        raise PreconditionError(f"{source.name} has no MatMul with a constant weight to quantize")
    kept, unused = excluded(matmuls, exclude)
    untied = untie(model, [n for n in matmuls if n.name not in kept])
    data = target.name + ".data"
    grids: dict[str, Any] = {"bits": {}, "corrected": 0, "nodes": [], "float": {}}
    candidates = [n for n in matmuls if n.name not in kept]
    if keep_grid:
        from pipeline.decoders.grid import store_grids

        grids = store_grids(model, candidates, block_size, ACCURACY_LEVEL[compute], fitted)
    elif method != "int8" and candidates:
        from onnx import numpy_helper

        from pipeline.decoders.grid import narrowest_grid

        # Say so when the weights rounded here already lie on a grid (the first one is probed).
        weights = {i.name: i for i in model.graph.initializer}
        probe = numpy_helper.to_array(weights[candidates[0].input[1]])
        grid = narrowest_grid(probe, block_size, fitted)
        grids["found"] = grid.bits if grid is not None else None
    # The grids' float remainder products are MatMuls with constant weights too, and a weight on a
    # grid kept float is exact as it is: neither is rounded onto a new grid.
    skip = sorted(
        set(kept) | set(grids["float"]) | {n.name for n in model.graph.node if ".grid." in n.name}
    )
    with quiet_quantizer():
        if method == "int8":
            # ORT's dynamic quantizer reads a file: the rewritten float graph, staged beside the
            # target and removed whether or not quantizing succeeds.
            staged = target.with_suffix(".float.onnx")
            try:
                onnx.save(
                    model, str(staged), save_as_external_data=True, location=staged.name + ".data"
                )
                quantize_dynamic(
                    str(staged),
                    str(target),
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    reduce_range=reduce_range,
                    op_types_to_quantize=["MatMul"],
                    nodes_to_exclude=skip,
                    use_external_data_format=True,
                )
            finally:
                staged.unlink(missing_ok=True)
                (staged.parent / (staged.name + ".data")).unlink(missing_ok=True)
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            # The default algorithm is blockwise round-to-nearest and honours bits, block size
            # and symmetry (the RTN config object would apply its own settings instead).
            quantizer = MatMulNBitsQuantizer(
                model,
                bits=8 if method == "int8-weight" else 4,
                block_size=block_size,
                # Symmetric: asymmetric blocks measured worse on SmolLM2 (INT4 perplexity +62%
                # against +36%, blockwise INT8 no better).
                is_symmetric=True,
                accuracy_level=ACCURACY_LEVEL[compute],
                nodes_to_exclude=skip,
            )
            quantizer.process()
            onnx.save(quantizer.model.model, str(target), save_as_external_data=True, location=data)
    quantized = onnx.load(str(target), load_external_data=False)
    ops = [n.op_type for n in quantized.graph.node]
    made = (
        sum(ops.count(op) for op in ("MatMulInteger", "DynamicQuantizeMatMul"))
        if method == "int8"
        else ops.count("MatMulNBits")
    )
    return {
        "weight_matmuls": len(matmuls),
        "quantized": made,
        "gemm_rewritten": gemms,
        "untied": untied,
        "kept_float": sorted(set(kept.values())),
        "kept_nodes": dict(sorted(kept.items())),
        "unmatched": sorted(unused),
        "grid": grids,
    }


def quantize_decoder(
    source: Path,
    out: Path,
    method: Method,
    block_size: int = 32,
    exclude: tuple[str, ...] = (),
    compute: str = "int8",
    keep_grid: bool = False,
    reduce_range: bool | None = None,
) -> dict[str, Any]:
    """Quantize both graphs of the decoder in ``source`` into ``out`` (other files copied).

    ``exclude``: module names, shell patterns of them, or node names kept in float.
    ``compute`` (weight-only methods): ``int8`` or ``float`` products (see ACCURACY_LEVEL).
    ``keep_grid`` (weight-only methods): weights that already lie on a 4- or 8-bit block grid
    (dequantized GGUF weights) are stored on it exactly (``pipeline.decoders.grid``); the
    method's bits and rounding apply to the others.
    ``reduce_range`` (int8): 7-bit weights; None: where this CPU's INT8 products saturate.
    """
    if reduce_range is None:
        reduce_range = method == "int8" and int8_products_saturate()
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {}
    fitted: dict[str, Any] = {}
    for name in (PREFILL, DECODE):
        stats[name.removesuffix(".onnx")] = _quantize_graph(
            source / name,
            out / name,
            method,
            block_size,
            exclude,
            compute,
            keep_grid,
            fitted,
            reduce_range,
        )
    copy_companions(source, out)
    short = [
        g
        for g, s in stats.items()
        if s["quantized"] + len(s["kept_nodes"]) + len(s["grid"]["float"]) < s["weight_matmuls"]
    ]
    if short:
        log.warning("decoder %s: not every weight MatMul was quantized in %s", method, short)
    # Both graphs were quantized alike: their weights are the same bytes, stored once.
    stats["shared"] = share_weights(out)
    return stats


def decoder_sensitivity(
    source: Path,
    feeds: list[dict[str, Any]],
    method: Method,
    block_size: int = 32,
    exclude: tuple[str, ...] = (),
    compute: str = "int8",
    threads: int = 1,
    reduce_range: bool = False,
) -> list[Any]:
    """Each weight MatMul the method quantizes, by its local SQNR on the prefill graph over
    ``feeds`` (ids, mask, positions of left-padded prompts; padding rows left out), most
    sensitive first: the method's rounding of that one product's weights (and activations where
    it rounds them) against the float product (``pipeline.sensitivity``). The graph is prepared
    as the quantizer prepares it: GPT-2's Gemms as MatMuls, a tied LM head untied; excluded
    nodes are left out. A packed node (q/k/v, gate/up) is named by its first projection's
    module, and says how many it packs (``layers.0.self_attn.q_proj +2 packed``).
    """
    from dataclasses import replace

    from pipeline.sensitivity import Blocks, matmul_sensitivity
    from pipeline.stages.export import load_onnx

    model = load_onnx(source / PREFILL)
    gemm_to_matmul(model)
    matmuls = _weight_matmuls(model)
    kept, _ = excluded(matmuls, exclude)
    untie(model, [n for n in matmuls if n.name not in kept])
    names = {i.name for i in model.graph.input}
    # A packed MatMul's output is split into its projections' outputs.
    splits = {n.input[0]: len(n.output) for n in model.graph.node if n.op_type == "Split"}
    packs = {
        n.name: splits[n.output[0]]
        for n in matmuls
        if n.name.endswith(".packed") and n.output[0] in splits
    }
    blocks = (
        None
        if method == "int8"
        else Blocks(8 if method == "int8-weight" else 4, block_size, compute == "int8")
    )
    ranked = matmul_sensitivity(
        model,
        ({k: v for k, v in feed.items() if k in names} for feed in feeds),
        per_channel=True,
        reduce_range=reduce_range,
        threads=threads,
        blocks=blocks,
        skip=set(kept),
    )
    return [
        replace(s, module=f"{s.module} +{packs[s.node] - 1} packed")
        if s.node in packs and s.module
        else s
        for s in ranked
    ]
