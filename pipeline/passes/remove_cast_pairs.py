"""Remove float round trips: a Cast to a narrower float type cast straight back.

    Cast(Cast(x: float32, to=float16), to=float32)  ->  x

FP16 conversion with float32 inputs and outputs and a block list leaves these where a kept-
float32 op (LayerNormalization) feeds a float32 graph output: its result is cast to float16
for the graph and back to float32 for the output. The pair only rounds, so removing it makes
the output more exact and saves two kernels. onnxscript's own cast-cast rule leaves this case
alone on purpose (it is not value-preserving); here the rounding is exactly what should go.

    Cast(Cast(mask: bool, to=float16), to=float32)  ->  Cast(mask, to=float32)

A bool through any number type is exact, so the middle Cast goes too.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from pipeline.passes.base import GraphPass, PassResult

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
#: Types that hold 0 and 1 exactly, as numbers (a string would hold "True").
_NUMBERS = _FLOATS | {
    ir.DataType.INT8,
    ir.DataType.INT16,
    ir.DataType.INT32,
    ir.DataType.INT64,
    ir.DataType.UINT8,
    ir.DataType.UINT16,
    ir.DataType.UINT32,
    ir.DataType.UINT64,
}


class _RoundTrip(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, to, inner):
        return op.Cast(op.Cast(x, to=inner), to=to)

    def check(self, context, x: ir.Value, to: ir.Attr, inner: ir.Attr) -> MatchResult:
        result = MatchResult()
        if x.dtype is None or x.dtype.value != to.as_int():
            return result.fail("the outer Cast does not restore the input's type")
        if ir.DataType(inner.as_int()) not in _FLOATS or x.dtype not in _FLOATS:
            return result.fail("not a round trip between float types")
        return result

    def rewrite(self, op, x: ir.Value, to: ir.Attr, inner: ir.Attr):
        return op.Identity(x)


class _BoolDetour(pattern.RewriteRuleClassBase):
    """``Cast(Cast(mask: bool, to=float16), to=float32)`` -> ``Cast(mask, to=float32)``: 0 and 1
    are exact in every type, so the middle type changes nothing. A decoder's exported mask
    arithmetic casts a bool to float; converted to float16 and feeding a reduction kept in
    float32, it gets this detour."""

    def pattern(self, op, x, to, inner):
        return op.Cast(op.Cast(x, to=inner), to=to)

    def check(self, context, x: ir.Value, to: ir.Attr, inner: ir.Attr) -> MatchResult:
        result = MatchResult()
        if x.dtype != ir.DataType.BOOL:
            return result.fail("the input is not bool")
        if not all(ir.DataType(a.as_int()) in _NUMBERS for a in (inner, to)):
            return result.fail("a Cast to a type that is not a number")
        return result

    def rewrite(self, op, x: ir.Value, to: ir.Attr, inner: ir.Attr):
        return op.Cast(x, to=to.as_int())


class RemoveCastPairs(GraphPass):
    name = "remove-cast-pairs"

    def run(self, model: ir.Model) -> PassResult:
        rules = [_RoundTrip.rule(), _BoolDetour.rule()]
        removed = pattern.RewriteRuleSet(rules).apply_to_model(model)
        return PassResult(model, removed > 0, {"cast_pairs_removed": removed})
