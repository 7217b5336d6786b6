"""Graph passes (one per file) and the optimisation profiles built from them.

Profiles:

* ``standard``: standard ONNX ops only, folded and cleaned: the input for TensorRT and any
  other runtime.
* ``ort``: ONNX Runtime's contrib ops (Attention or MultiHeadAttention, SkipLayerNormalization,
  BiasGelu) for its CPU and CUDA execution providers; which fusions run is the variant's
  ``fusions`` list (``attention`` packs the Q/K/V projections into the op, ``mha`` fuses only
  the attention core and leaves the projections as MatMuls, for INT8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pipeline.passes.base import GraphPass, PassRecord, PassResult, op_counts, run_passes
from pipeline.passes.fold_constants import FoldConstants
from pipeline.passes.fuse_attention import FuseAttention
from pipeline.passes.fuse_ffn import FuseFFN
from pipeline.passes.fuse_layernorm import FuseLayerNorm
from pipeline.passes.fuse_mha import FuseMultiHeadAttention
from pipeline.passes.infer_shapes import InferShapes
from pipeline.passes.remove_unused import RemoveUnused
from pipeline.passes.residual_sum import ResidualSum

Profile = Literal["standard", "ort"]
Fusion = Literal["attention", "mha", "skip-layernorm", "ffn"]

#: Fusion name -> its pass, in the order they run (the skip fusion first, as onnxscript's
#: own pipeline does: the attention patterns expect the residual adds already absorbed).
FUSIONS: dict[str, type[GraphPass]] = {
    "skip-layernorm": FuseLayerNorm,
    "attention": FuseAttention,
    "mha": FuseMultiHeadAttention,
    "ffn": FuseFFN,
}

#: Fusion name -> (the op it makes, how many one encoder layer has).
FUSED_OPS: dict[str, tuple[str, int]] = {
    "attention": ("Attention", 1),
    "mha": ("MultiHeadAttention", 1),
    "skip-layernorm": ("SkipLayerNormalization", 2),
    "ffn": ("BiasGelu", 1),
}

#: Ops reported as "fused" in a graph, whatever made them.
FUSED_OP_TYPES = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "Gelu",
    "FastGelu",
    "EmbedLayerNormalization",
)


def profile_passes(
    profile: Profile, fusions: Sequence[str] = (), residual_sum: bool = False
) -> list[GraphPass]:
    """The passes of a profile, in order (``residual_sum``: see passes.residual_sum)."""
    passes: list[GraphPass] = [InferShapes(), FoldConstants()]
    if profile == "ort":
        passes += [FUSIONS[name]() for name in FUSIONS if name in fusions]
        # Packed QKV weights are a Concat of initializers until folded with large limits.
        passes += [FoldConstants(large=True)]
        if residual_sum:
            passes += [ResidualSum()]
    passes += [RemoveUnused(), InferShapes()]
    return passes


__all__ = [
    "FUSED_OPS",
    "FUSED_OP_TYPES",
    "FUSIONS",
    "Fusion",
    "GraphPass",
    "PassRecord",
    "PassResult",
    "Profile",
    "op_counts",
    "profile_passes",
    "run_passes",
]
