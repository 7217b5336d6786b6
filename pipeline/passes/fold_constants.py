"""Fold constant subgraphs, simplify shape arithmetic, drop identities and dead nodes.

    Concat(Constant, Constant) -> Constant        Shape(x)[1] on a static dim -> Constant
    Identity(x) -> x                              a node nobody reads -> (removed)

onnxscript's optimizer does the folding. The size limits matter: with its defaults a tensor
above 256 KiB is never folded, so the packed QKV weight the attention fusion builds
(Concat of three weight matrices) would stay a Concat run on every call. After fusion this
pass runs again with ``large=True`` for exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
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
        removed = before - len(model.graph)
        return PassResult(
            model, bool(removed or shapes), {"nodes_removed": removed, "shape_rewrites": shapes}
        )
