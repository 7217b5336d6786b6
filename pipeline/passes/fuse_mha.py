"""Fuse the attention core into ONNX Runtime's MultiHeadAttention op, keeping the projections.

    MatMul(q) MatMul(k) MatMul(v) + Reshape/Transpose + MatMul + Softmax(+mask) + MatMul
        ->  MatMul(q) MatMul(k) MatMul(v) + MultiHeadAttention(q, k, v, bias, mask)

The same onnxscript rules as fuse-attention, stopping before the packed-QKV Attention. This is
the form INT8 wants: the Q, K and V projections stay MatMuls, so the quantizer gives each its
own per-channel weight scales, while the attention core (scores, mask, softmax, context) is
one fused float kernel. Packed Attention would either stay in float (a quarter of the layer's
weight FLOPs) or become QAttention, which loses far more accuracy on MiniLM (mean cosine 0.84
against 0.993 with this form; BENCHMARKS.md, "INT8").
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.passes._fusion import Step
from pipeline.passes.fuse_attention import FuseAttention


class FuseMultiHeadAttention(FuseAttention):
    name = "fuse-mha"
    produces = ("MultiHeadAttention",)

    def steps(self) -> Sequence[Step]:
        return tuple(step for step in super().steps() if step[0] != "attention")
