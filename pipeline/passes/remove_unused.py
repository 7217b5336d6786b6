"""Remove what nothing reads: nodes, functions, initializers, opset imports.

MatMul -> (output read by no one)  ->  (removed)
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from pipeline.passes.base import GraphPass, PassResult


class RemoveUnused(GraphPass):
    name = "remove-unused"

    def run(self, model: ir.Model) -> PassResult:
        nodes, initializers = len(model.graph), len(model.graph.initializers)
        passes = ir.passes.Sequential(
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        )
        result = passes(model)
        stats = {
            "nodes_removed": nodes - len(result.model.graph),
            "initializers_removed": initializers - len(result.model.graph.initializers),
        }
        return PassResult(result.model, result.modified, stats)
