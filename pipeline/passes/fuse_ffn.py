"""Fuse the feed-forward block's GELU and its bias.

0.5 * x * (1 + Erf(x / sqrt 2))  ->  Gelu(x)
Gelu(Add(MatMul(x, W1), b1))     ->  BiasGelu(MatMul(x, W1), b1)
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu

from pipeline.passes._fusion import FusionPass, Step


class FuseFFN(FusionPass):
    name = "fuse-ffn"
    produces = ("BiasGelu", "Gelu", "FastGelu")

    def steps(self) -> Sequence[Step]:
        return (
            ("erf_gelu", fuse_erfgelu, {}),
            ("gelu", fuse_gelu, {}),
            ("bias_gelu", fuse_bias_gelu, {}),
        )
