"""What the fusion passes share: running onnxscript's ORT fusion rules and explaining misses.

Each fusion pass is a list of steps, each one onnxscript rule set (``fuse_sdpa``,
``fuse_skip_layer_normalization``...) returning how often it matched. ``explain`` runs the
same steps on a copy with the rewriter's tracer on and returns what it printed: why each
pattern did not match, for ``-v`` when a build has fewer fusions than its architecture expects.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir

from pipeline.passes.base import GraphPass, PassResult, count_ops, require_shapes

Step = tuple[str, Callable[..., int], dict[str, Any]]


class FusionPass(GraphPass):
    """Runs ``steps`` in order; stats are each step's matches and the fused ops in the graph."""

    #: The ops this fusion produces, counted in the graph afterwards.
    produces: tuple[str, ...] = ()

    def steps(self) -> Sequence[Step]:
        raise NotImplementedError

    def requires(self, model: ir.Model) -> None:
        require_shapes(model, self.name)

    def run(self, model: ir.Model) -> PassResult:
        stats = {label: int(fuse(model, **kwargs)) for label, fuse, kwargs in self.steps()}
        stats.update({op: count_ops(model, op) for op in self.produces})
        return PassResult(model, any(stats[label] for label, _, _ in self.steps()), stats)

    def explain(self, model: ir.Model) -> str:
        """The rewriter's reasons for each pattern that did not match (on a copy of ``model``)."""
        copy = ir.from_proto(ir.to_proto(model))
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            for _, fuse, kwargs in self.steps():
                fuse(copy, debug=True, **kwargs)
        return text.getvalue().strip()
