"""The graph-pass contract: one ONNX model in memory in, the same model changed, counts out.

A pass never touches files, the clock or globals. ``requires`` checks a precondition and says
which pass to run first; ``run`` transforms the model in place and returns what it did.
``run_passes`` runs a list in order, times each from outside and, when one fails, names the
passes that ran before it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir

from pipeline.errors import PassError, PreconditionError, first_line


@dataclass(frozen=True)
class PassResult:
    model: ir.Model
    changed: bool
    #: What the pass did, for the manifest and the report (fusions made, nodes removed...).
    stats: dict[str, int] = field(default_factory=dict)


class GraphPass(ABC):
    name: ClassVar[str]

    def requires(self, model: ir.Model) -> None:  # noqa: B027 (optional hook)
        """Raise PreconditionError naming the pass to run first."""

    @abstractmethod
    def run(self, model: ir.Model) -> PassResult: ...

    def __call__(self, model: ir.Model) -> PassResult:
        self.requires(model)
        return self.run(model)


@dataclass(frozen=True)
class PassRecord:
    name: str
    changed: bool
    stats: dict[str, int]
    seconds: float
    nodes_before: int
    nodes_after: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "changed": self.changed,
            "stats": self.stats,
            "seconds": round(self.seconds, 3),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


def op_counts(model: ir.Model) -> Counter[str]:
    """Op types of the main graph (``domain.Op`` outside the default domain)."""
    return Counter(
        node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        for node in model.graph
    )


def count_ops(model: ir.Model, op_type: str) -> int:
    return sum(1 for node in model.graph if node.op_type == op_type)


def has_value_shapes(model: ir.Model) -> bool:
    """True when shape inference has run: at least half the node outputs carry a shape."""
    outputs = [value for node in model.graph for value in node.outputs]
    if not outputs:
        return True
    known = sum(1 for value in outputs if value.type is not None and value.shape is not None)
    # Half, not all: a fused op's own outputs may stay unshaped (ONNX shape inference does
    # not know ONNX Runtime's contrib ops), while what the next patterns look at keeps its shape.
    return known >= 0.5 * len(outputs)


def require_shapes(model: ir.Model, name: str) -> None:
    if not has_value_shapes(model):
        raise PreconditionError(
            f"{name}: the graph's values have no shapes; the fusion patterns check them",
            "run infer-shapes first",
        )


def run_passes(
    model: ir.Model,
    passes: Sequence[GraphPass],
    on_pass: Callable[[PassRecord], None] | None = None,
) -> tuple[ir.Model, list[PassRecord]]:
    """Run ``passes`` in order; a failure names the pass and those that ran before it."""
    records: list[PassRecord] = []
    for graph_pass in passes:
        before = len(model.graph)
        start = time.perf_counter()
        try:
            result = graph_pass(model)
        except PreconditionError:
            raise
        # A pass is library code on an arbitrary graph: any failure is reported with context.
        except Exception as error:
            ran = ", ".join(r.name for r in records) or "none"
            raise PassError(
                f"pass {graph_pass.name} failed (after: {ran}): {type(error).__name__}: {first_line(error)}",
                "run with -v for the full error; build with optimize: none to skip graph passes",
            ) from error
        model = result.model
        record = PassRecord(
            graph_pass.name,
            result.changed,
            dict(result.stats),
            time.perf_counter() - start,
            before,
            len(model.graph),
        )
        records.append(record)
        if on_pass is not None:
            on_pass(record)
    return model, records
