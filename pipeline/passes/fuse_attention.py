"""Fuse self-attention into ONNX Runtime's Attention op.

    MatMul(q) MatMul(k) MatMul(v) + Reshape/Transpose + MatMul + Softmax(+mask) + MatMul
        ->  Attention(x, packed QKV weight, packed bias, mask)

onnxscript's rules, in their order: scaled dot-product attention (SDPA), then
MultiHeadAttention around it, its scale and biases, then the packed-QKV Attention. The
QKV weights end up concatenated; fold-constants (large) afterwards makes that one weight.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter.ort_fusions.attention import fuse_attention
from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

from pipeline.passes._fusion import FusionPass, Step


class FuseAttention(FusionPass):
    name = "fuse-attention"
    produces: tuple[str, ...] = ("Attention", "MultiHeadAttention")

    def steps(self) -> Sequence[Step]:
        return (
            ("sdpa", fuse_sdpa, {"apply_shape_inference": True}),
            ("mha", fuse_mha1, {}),
            ("mha_transposed", fuse_mha2, {}),
            ("mha_scale", fuse_mha_scale, {}),
            ("mha_bias", fuse_mha_bias, {}),
            ("attention", fuse_attention, {}),
        )
