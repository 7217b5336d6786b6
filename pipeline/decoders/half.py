"""Float16 prefill and decode graphs: the form a decoder ships in to a GPU.

Weights, activations and the KV cache are float16; the graph inputs other than the cache
(token ids, mask, positions) and the logits stay as they were, so a generation loop feeds and
reads a float16 decoder as it does a float32 one, and threads the float16 cache from each
step's ``present.N.*`` outputs into the next step's ``past.N.*`` inputs unchanged (half the
cache memory of float32). The conversion is the fp16 stage's (ONNX Runtime's converter and the
same clean-up, :func:`pipeline.stages.fp16.to_float16`).

Kept in float32 by default: the unfused reductions and Softmax, whose sums overflow float16.
The fused normalisations are not: ONNX Runtime's (Skip)(Simplified)LayerNormalization kernels
accumulate in float32 whatever their input type, so keeping them float32 would add a Cast on
each side of every one (about 300 on SmolLM2-135M, 5 without) for no measurable accuracy: on
SmolLM2-135M (64 prompts x 32 tokens, ONNX Runtime CPU) teacher-forced agreement was 0.9995
without them and 0.9990 with them, mean logit error 0.0092 and 0.0081 (one decision in 2048
apart: a tie). ONNX's own RMSNormalization is not one of ONNX Runtime's fused kernels and stays
float32. A model whose residual stream leaves float16's range shows it as non-finite logits in
verification (a failed check); its variant's ``keep_float`` then lists the normalisations
besides the defaults it replaces (``DECODER_KEEP_FLOAT``), which keeps the residual stream
they carry in float32 too.

On ONNX Runtime's x86 CPU provider (measured on the optimized SmolLM2 graph), the
normalisations, rotary embeddings and attention run in float16 kernels; the MatMuls have no
float16 kernel, so the session casts their inputs to float32 (folding the Casts of the float16
weights into float32 copies when it starts) and rounds their outputs back to float16. A CPU
build therefore verifies float16 weights, activations rounded to float16 between ops and a
float16 cache, with float32 products; its CPU latency is not a float16 speed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.decoders.export import DECODE, PREFILL, copy_companions, share_weights
from pipeline.stages.fp16 import KEEP_FLOAT, half_stats, require_no_cascades, to_float16

#: ONNX Runtime's fused normalisations, which accumulate in float32 internally (ONNX's own
#: RMSNormalization is not among them: it stays float32, as in the encoder list).
FUSED_NORMS = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
)
#: Op types a float16 decoder keeps in float32 by default.
DECODER_KEEP_FLOAT = tuple(op for op in KEEP_FLOAT if op not in FUSED_NORMS)
#: The KV cache's graph inputs and outputs, which become float16.
_CACHE = re.compile(r"^(past|present)\.\d+\.(key|value)$")


def _kept_io(model: Any) -> list[str]:
    """Graph inputs and outputs that keep their type: everything but the cache."""
    return [v.name for v in (*model.graph.input, *model.graph.output) if not _CACHE.match(v.name)]


def _cache_types(model: Any) -> dict[str, int]:
    """Element type -> how many cache inputs and outputs have it (``FLOAT16``: 4 per layer)."""
    import onnx

    counts: dict[str, int] = {}
    for value in (*model.graph.input, *model.graph.output):
        if _CACHE.match(value.name):
            name = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
            counts[name] = counts.get(name, 0) + 1
    return counts


def half_decoder(
    source: Path, out: Path, keep_float: tuple[str, ...] = DECODER_KEEP_FLOAT
) -> dict[str, Any]:
    """Both graphs of the decoder in ``source`` in float16, into ``out`` (other files copied,
    weights stored once for both graphs). Returns per graph: Casts, kept-float ops by type, the
    cache's element types; and the shared weights' sizes."""
    import onnx
    import onnx_ir as ir

    from pipeline.stages.export import load_onnx

    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {}
    for name in (PREFILL, DECODE):
        model = load_onnx(source / name)
        graph, records = to_float16(model, _kept_io(model), keep_float)
        ir.save(graph, out / name, external_data=f"{name}.data")
        written = onnx.load(str(out / name), load_external_data=False)
        require_no_cascades(written)
        stats[name.removesuffix(".onnx")] = {
            **half_stats(written, keep_float),
            "cache": _cache_types(written),
            "passes": [r.as_dict() for r in records],
        }
    copy_companions(source, out)
    stats["shared"] = share_weights(out)
    return stats
