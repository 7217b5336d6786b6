"""Stage ``fp16``: the float graph in float16, with float32 inputs, outputs and fragile ops.

ONNX Runtime's converter (``onnxruntime.transformers.float16``) does the conversion, keeping
graph inputs and outputs float32 (``keep_io_types``) and the ops of ``keep_float`` in float32
through Casts at their borders: normalisations and reductions, whose sums of squares overflow
float16's 65504, and Softmax, whose exponentials do. onnxconverter-common's converter is not
used: it writes a graph ONNX Runtime refuses when a graph output also feeds a Gather.

Afterwards: float round trips the block list leaves at the outputs (float32 -> float16 ->
float32) are removed, Casts of constant weights are folded into float32 weights, and nothing
cascaded is left (checked).

Input: a float model folder; output: ``model/`` in the same layout.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import Artifact
from pipeline.errors import PassError
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.export import (
    MODEL_FILE,
    graph_stats,
    load_onnx,
    require_model_file,
    uses_external_data,
)
from pipeline.stages.load import TOKENIZER_FILES

#: Op types kept in float32 by default.
KEEP_FLOAT = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "Softmax",
    "Pow",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
)


class Fp16Config(StageConfig):
    keep_float: tuple[str, ...] = KEEP_FLOAT


def cascaded_casts(model: object) -> list[str]:
    """Casts whose input is another Cast's output (names of the outer ones)."""
    graph = model.graph  # type: ignore[attr-defined]
    producers = {out: node for node in graph.node for out in node.output}
    return [
        node.name
        for node in graph.node
        if node.op_type == "Cast"
        and node.input[0] in producers
        and producers[node.input[0]].op_type == "Cast"
    ]


def to_float16(
    model: Any, keep_io_types: bool | list[str], keep_float: Sequence[str]
) -> tuple[Any, list[Any]]:
    """``model`` (an ``onnx.ModelProto``) in float16: ONNX Runtime's converter, then the
    clean-up passes (round trips removed, constant Casts folded, dead nodes dropped, shapes
    inferred). ``keep_io_types``: True for every graph input and output, or the names kept
    float32. Returns the onnx_ir model and the passes' records."""
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from pipeline.passes import run_passes
    from pipeline.passes.fold_constants import FoldConstants
    from pipeline.passes.infer_shapes import InferShapes
    from pipeline.passes.remove_cast_pairs import RemoveCastPairs
    from pipeline.passes.remove_unused import RemoveUnused

    half = convert_float_to_float16(
        model, keep_io_types=keep_io_types, op_block_list=list(keep_float)
    )
    return run_passes(
        ir.from_proto(half),
        [RemoveCastPairs(), FoldConstants(large=True), RemoveUnused(), InferShapes()],
    )


def require_no_cascades(model: Any) -> None:
    """A converted graph must not hold a Cast of a Cast (the clean-up removes them all)."""
    cascades = cascaded_casts(model)
    if cascades:
        raise PassError(
            f"float16 conversion left cascaded Casts: {cascades[:5]}",
            "this is a bug in the fp16 stage: report it with the model type",
        )


def half_stats(model: Any, keep_float: Sequence[str]) -> dict[str, Any]:
    """The Casts of a converted graph and the ops it kept in float32, by type."""
    kept = Counter(n.op_type for n in model.graph.node if n.op_type in keep_float)
    return {
        "casts": sum(1 for n in model.graph.node if n.op_type == "Cast"),
        "kept_float": dict(sorted(kept.items())),
    }


#: The float16 conversion's version (:func:`to_float16`), for the stages that run it.
#: 2: a bool cast through float16 to float32 is cast once (RemoveCastPairs).
CONVERSION_VERSION = 2


class Fp16Stage(Stage[Fp16Config]):
    name = "fp16"
    version = CONVERSION_VERSION

    def requires(self, inputs: Mapping[str, Artifact]) -> None:
        require_model_file("fp16", inputs["model"].path)

    def describe(self) -> str:
        return "convert to float16"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        import onnx
        import onnx_ir as ir

        source = inputs["model"].path
        model = load_onnx(source / MODEL_FILE)
        external = uses_external_data(onnx.load(str(source / MODEL_FILE), load_external_data=False))
        with ctx.progress.task("convert to float16", 1) as advance:
            graph, records = to_float16(model, True, self.config.keep_float)
            advance(1)
        target = out / "model"
        target.mkdir()
        path = target / MODEL_FILE
        ir.save(graph, path, external_data=MODEL_FILE + ".data" if external else None)
        written = onnx.load(str(path), load_external_data=False)
        require_no_cascades(written)
        for name in ("config.json", *TOKENIZER_FILES):
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
        types = Counter(
            onnx.TensorProto.DataType.Name(init.data_type) for init in written.graph.initializer
        )
        stats = {
            **half_stats(written, self.config.keep_float),
            "initializer_types": dict(sorted(types.items())),
            "passes": [r.as_dict() for r in records],
            **graph_stats(path),
        }
        return StageResult(outputs={"model": "model"}, stats=stats)
