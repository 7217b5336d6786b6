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
from collections.abc import Mapping
from pathlib import Path

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


class Fp16Stage(Stage[Fp16Config]):
    name = "fp16"

    def requires(self, inputs: Mapping[str, Artifact]) -> None:
        require_model_file("fp16", inputs["model"].path)

    def describe(self) -> str:
        return "convert to float16"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        import onnx
        import onnx_ir as ir
        from onnxruntime.transformers.float16 import convert_float_to_float16

        from pipeline.passes import run_passes
        from pipeline.passes.fold_constants import FoldConstants
        from pipeline.passes.infer_shapes import InferShapes
        from pipeline.passes.remove_cast_pairs import RemoveCastPairs
        from pipeline.passes.remove_unused import RemoveUnused

        source = inputs["model"].path
        model = load_onnx(source / MODEL_FILE)
        external = uses_external_data(onnx.load(str(source / MODEL_FILE), load_external_data=False))
        with ctx.progress.task("convert to float16", 2) as advance:
            half = convert_float_to_float16(
                model,
                keep_io_types=True,
                op_block_list=list(self.config.keep_float),
            )
            advance(1)
            graph, records = run_passes(
                ir.from_proto(half),
                [RemoveCastPairs(), FoldConstants(large=True), RemoveUnused(), InferShapes()],
            )
            advance(1)
        target = out / "model"
        target.mkdir()
        path = target / MODEL_FILE
        ir.save(graph, path, external_data=MODEL_FILE + ".data" if external else None)
        written = onnx.load(str(path), load_external_data=False)
        cascades = cascaded_casts(written)
        if cascades:
            raise PassError(
                f"float16 conversion left cascaded Casts: {cascades[:5]}",
                "this is a bug in the fp16 stage: report it with the model type",
            )
        for name in ("config.json", *TOKENIZER_FILES):
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
        types = Counter(
            onnx.TensorProto.DataType.Name(init.data_type) for init in written.graph.initializer
        )
        kept = Counter(n.op_type for n in written.graph.node if n.op_type in self.config.keep_float)
        stats = {
            "casts": sum(1 for n in written.graph.node if n.op_type == "Cast"),
            "initializer_types": dict(sorted(types.items())),
            "kept_float": dict(sorted(kept.items())),
            "passes": [r.as_dict() for r in records],
            **graph_stats(path),
        }
        return StageResult(outputs={"model": "model"}, stats=stats)
