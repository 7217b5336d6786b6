"""Infer the type and shape of every value (ONNX shape inference, through onnx-ir).

    values without shapes  ->  values with (symbolic) shapes

The fusion patterns check head counts and hidden sizes on value shapes; they match nothing
on a graph without them.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from pipeline.passes.base import GraphPass, PassResult


class InferShapes(GraphPass):
    name = "infer-shapes"

    def run(self, model: ir.Model) -> PassResult:
        def known() -> int:
            return sum(1 for node in model.graph for v in node.outputs if v.shape is not None)

        before = known()
        result = common.ShapeInferencePass()(model)
        return PassResult(result.model, result.modified, {"values_with_shape": known() - before})
