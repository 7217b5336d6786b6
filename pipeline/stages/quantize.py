"""Stage ``quantize``: INT8 with weights quantized per channel and activations at run time.

ONNX Runtime's dynamic quantizer does the rewrite (MatMul with a constant weight ->
DynamicQuantizeLinear + MatMulInteger); the attention core (MultiHeadAttention) stays in float. Its call succeeds even
when it quantized nothing (a graph without value types gets no quantized MatMul at all), so the
stage counts what was quantized and fails when a graph that has weight MatMuls came back
without any.

Input: a model folder (exported or optimized); output: ``model/`` in the same layout.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pipeline.artifacts import Artifact
from pipeline.errors import PreconditionError, first_line
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.export import (
    _TWO_GB,
    MODEL_FILE,
    graph_stats,
    require_model_file,
    uses_external_data,
)
from pipeline.stages.load import TOKENIZER_FILES

log = logging.getLogger(__name__)

#: Ops the dynamic quantizer leaves behind for a quantized MatMul.
QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


class QuantizeConfig(StageConfig):
    method: Literal["dynamic"] = "dynamic"
    #: One scale per output channel of each weight (per-tensor loses ~0.03 cosine on MiniLM).
    per_channel: bool = True
    #: 7-bit weights, for CPUs without VNNI where 8-bit products can saturate.
    reduce_range: bool = False
    #: Node names kept in float.
    exclude: tuple[str, ...] = ()


def weight_matmuls(model: Any) -> list[str]:
    """MatMul nodes whose second input is an initializer: what dynamic INT8 can quantize."""
    constants = {init.name for init in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in constants
    ]


class QuantizeStage(Stage[QuantizeConfig]):
    name = "quantize"

    def requires(self, inputs: Mapping[str, Artifact]) -> None:
        require_model_file("quantize", inputs["model"].path)

    def describe(self) -> str:
        return f"quantize int8 {self.config.method}"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        source = inputs["model"].path
        float_model = onnx.load(str(source / MODEL_FILE), load_external_data=False)
        candidates = weight_matmuls(float_model)
        unknown = sorted(set(self.config.exclude) - {n.name for n in float_model.graph.node})
        if unknown:
            raise PreconditionError(
                f"quantize.exclude names nodes the graph does not have: {unknown[:5]}",
                "take node names from `tforge inspect` of the variant's float model",
            )
        target = out / "model"
        target.mkdir()
        path = target / MODEL_FILE
        large = sum(init.ByteSize() for init in float_model.graph.initializer) > _TWO_GB
        with ctx.progress.task("quantize (int8, dynamic)", 1) as advance:
            try:
                quantize_dynamic(
                    source / MODEL_FILE,
                    path,
                    weight_type=QuantType.QInt8,
                    per_channel=self.config.per_channel,
                    reduce_range=self.config.reduce_range,
                    # MatMul only: INT8 variants fuse attention as MultiHeadAttention, so the
                    # Q/K/V projections are MatMuls here. A packed Attention would become
                    # QAttention, which loses far more (mean cosine 0.84, agreement 0.48).
                    op_types_to_quantize=["MatMul"],
                    nodes_to_exclude=list(self.config.exclude),
                    use_external_data_format=large or uses_external_data(float_model),
                    extra_options={"MatMulConstBOnly": True},
                )
            # The quantizer fails in library terms (e.g. "Unable to find data type for
            # weight_name" on a graph without value types): said in one line, with the fix.
            except Exception as error:
                log.debug("quantization failed", exc_info=True)
                raise PreconditionError(
                    f"ONNX Runtime's quantizer failed: {type(error).__name__}: {first_line(error)}",
                    "quantize an optimized graph (optimize: ort or standard), which carries value types",
                ) from error
            advance(1)
        quantized_model = onnx.load(str(path), load_external_data=False)
        ops = Counter(node.op_type for node in quantized_model.graph.node)
        quantized = sum(ops[op] for op in QUANTIZED_OPS)
        float_matmuls = {n.name for n in quantized_model.graph.node if n.op_type == "MatMul"}
        still_float = sorted((set(candidates) - set(self.config.exclude)) & float_matmuls)
        expected = len(candidates) - len(set(self.config.exclude) & set(candidates))
        if quantized < expected:
            raise PreconditionError(
                f"only {quantized} of {expected} weight MatMuls were quantized; still float: {still_float[:5]}",
                "the graph probably lacks value types; quantize an optimized graph (optimize: ort or standard)",
            )
        for name in ("config.json", *TOKENIZER_FILES):
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
        stats = {
            "method": self.config.method,
            "weight_matmuls": len(candidates),
            "quantized_matmuls": quantized,
            "kept_float": sorted(set(self.config.exclude)),
            **graph_stats(path),
        }
        return StageResult(outputs={"model": "model"}, stats=stats)
