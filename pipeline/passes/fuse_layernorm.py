"""Fuse the residual add into the layer normalisation after it.

    LayerNormalization(Add(x, residual))  ->  SkipLayerNormalization(x, residual)

The exporter already emits LayerNormalization as one op (opset >= 17), so only the skip
fusion is left; both are counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_layer_normalization

from pipeline.passes._fusion import FusionPass, Step


class FuseLayerNorm(FusionPass):
    name = "fuse-skip-layernorm"
    produces = ("SkipLayerNormalization", "LayerNormalization")

    def steps(self) -> Sequence[Step]:
        return (("skip_layer_normalization", fuse_skip_layer_normalization, {}),)
