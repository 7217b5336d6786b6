"""Fold constant subgraphs, simplify shape arithmetic, drop identities and dead nodes.

    Concat(Constant, Constant) -> Constant        Shape(x)[1] on a static dim -> Constant
    Identity(x) -> x                              a node nobody reads -> (removed)

onnxscript's optimizer does the folding. The size limits matter: with its defaults (8192 input
and 262144 output elements) a weight matrix is never folded, so the packed QKV weight the attention fusion builds
(Concat of three weight matrices) would stay a Concat run on every call. After fusion this
pass runs again with ``large=True`` for exactly that, then merges identical weights: layers
that share one weight (ALBERT) would otherwise get one folded copy each.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
from onnxscript.rewriter.ort_fusions import shape_optimization

from pipeline.passes.base import GraphPass, PassResult

#: Tensors up to 16 Mi elements are folded: every weight of a BERT-large-sized layer.
LARGE = 1 << 24


@dataclass(frozen=True)
class FoldConstants(GraphPass):
    #: Fold tensors of any weight size (after fusion), not only small shape tensors.
    large: bool = False
    name = "fold-constants"

    def run(self, model: ir.Model) -> PassResult:
        before = len(model.graph)

        def fold() -> None:
            if self.large:
                onnxscript.optimizer.optimize(
                    model, input_size_limit=LARGE, output_size_limit=LARGE
                )
            else:
                onnxscript.optimizer.optimize(model)

        fold()
        # Shape arithmetic simplified by a rewrite can fold further, which can simplify again.
        shapes = 0
        for _ in range(3):
            changed = shape_optimization.rules.apply_to_model(model)
            if not changed:
                break
            shapes += changed
            fold()
        merged = 0
        if self.large:
            initializers = len(model.graph.initializers)
            common.DeduplicateInitializersPass(size_limit=LARGE)(model)
            merged = initializers - len(model.graph.initializers)
        removed = before - len(model.graph)
        return PassResult(
            model,
            bool(removed or shapes or merged),
            {"nodes_removed": removed, "shape_rewrites": shapes, "weights_merged": merged},
        )
