"""Graph fusions for a decoder's prefill and decode graphs, checked by running them.

* ``skip-layernorm``: RMSNorm into ``SimplifiedLayerNormalization`` and, with the residual add
  before it, ``SkipSimplifiedLayerNormalization`` (Llama, Qwen2); LayerNorm with its residual
  add into ``SkipLayerNormalization`` (GPT-2, Phi, GPT-NeoX). onnxscript's rules.
* ``rotary``: the rotary position embedding of queries and keys into ONNX Runtime's
  ``RotaryEmbedding``, which reads cos/sin from a table indexed by ``position_ids``.
* ``attention``: the whole attention of a layer (head reshapes, rotary, cache concat, the
  key/value heads repeated for grouped queries, softmax(QK^T)V) into one ``GroupQueryAttention``
  that also writes the new cache. A rotary model needs ``rotary`` fused first; GPT-2's
  attention, without rotary, becomes GroupQueryAttention with as many key/value heads as heads;
  Qwen3's per-head query and key normalisations stay before it (the op has none), which needs
  ``skip-layernorm`` too (it turns them into the SimplifiedLayerNormalization the rule reads).
  Phi and GPT-NeoX rotate only the first dimensions of each head: the queries and keys go
  through one RotaryEmbedding each with ``rotary_embedding_dim``; GPT-NeoX's projection packs
  q, k and v head by head, and is split into q, k and v first (:func:`_heads_first_split_rule`).
* ``pack``: the MatMuls reading one value (q/k/v, gate/up; Phi's q/k/v and fc1) into one
  MatMul and a Split, so a Llama layer reads its input twice, not five times; groups with a projection quantize.exclude
  names stay apart (:func:`pack_projections`).

Why our own rules, beside onnxscript's:

* The cos/sin table: onnxscript's ``cos_sin_cache`` rule matches the angle computation of older
  transformers (``inv_freq @ position_ids``, then a Transpose); transformers 5 computes it
  elementwise (``position_ids[..., None].float() * inv_freq``), which no onnxscript rule matches,
  so its RotaryEmbedding fusion is inlined back and nothing is fused. :class:`RotaryTableFusion`
  matches the elementwise form and precomputes the table for every position the model takes
  (``max_position_embeddings``).
* GroupQueryAttention: onnxscript's GQA rule derives each row's length from ``position_ids`` and
  drops the attention mask (ONNX Runtime GenAI's convention: right-padded rows). Our generation
  runner left-pads, so :class:`LeftPaddedAttention` keeps the mask: every row's length is the
  full mask width, and the graph's own additive mask (padding and causal) goes in as
  ``attention_bias``; the queries and keys are rotated as 3-D tensors before the op, with the
  positions the runner gives. transformers' own ``OnnxConfig(ort_fusions="cpu")`` (5.24) keeps
  the mask too, and packs the projections as ``pack`` does, but rotates inside
  GroupQueryAttention, whose CPU kernel counts a prompt's
  positions from its first column: a left-padded row's keys are cached at shifted positions.
  Measured on SmolLM2 at batch 8 with one row padded by 5 tokens: its logits 19.3 off the
  unfused graph's and 95.7% of its decisions; ours 1.3e-4 and 100%.

At batch 1 a 135M decoder's decode step is dominated by small ops, not by its MatMuls: with
INT4 weights ONNX Runtime runs 2,094 nodes of the exported SmolLM2 decode graph per token (2,245
before its own fusions), and the 211 MatMulNBits take about a third of the kernel time; the
fused graph has 463 (BENCHMARKS.md, "Decoder fusions").

Every fused graph is run against the unfused one on a left-padded sample (prefill and one
decode step) before it is kept; a fusion that fails to load or run, or changes the logits, is
dropped and the reason recorded (``fallback``), and the graphs keep the fusions before it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.decoders.export import DECODE, PREFILL, WEIGHTS, share_weights
from pipeline.errors import first_line
from pipeline.recipe import DECODER_FUSIONS

log = logging.getLogger(__name__)


#: The ops each fusion makes (counted in the fused graphs).
FUSED_BY = {
    "skip-layernorm": (
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "SkipLayerNormalization",
    ),
    "rotary": ("RotaryEmbedding",),
    "attention": ("GroupQueryAttention",),
    "pack": (),
}

#: How the fused-op counts name the MatMuls the ``pack`` fusion made.
PACKED = "MatMul (packed)"

#: The ops counted against the architecture's expectation, per fusion: the residual
#: normalisations (the plain first one is listed in the graph's ops, not counted).
COUNTED = {
    "skip-layernorm": ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization"),
    "rotary": ("RotaryEmbedding",),
    "attention": ("GroupQueryAttention",),
    "pack": (PACKED,),
}

#: The model types whose layout the tests cover hold their counts to an expectation: these
#: with rotary attention in every layer, attention then MLP (Qwen3's query and key heads
#: normalised before it); the parallel ones below; GPT-2. Others are fused too, and checked by
#: running, but their counts are not held to an expectation (SmolLM3's layers without rotary,
#: for one). A scaled rotary embedding that multiplies cos/sin (YaRN's attention scaling)
#: matches no rotary rule: such a checkpoint keeps rotary and attention unfused, and the report
#: says why.
SEQUENTIAL_ROTARY_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3"})
#: Model types that rotate part of each head and run attention and MLP side by side from one
#: residual (Phi-1.5/Phi-2, GPT-NeoX/Pythia; a GPT-NeoX with ``use_parallel_residual: false``
#: has a second residual normalisation per layer, above the expectation, which is a minimum).
PARALLEL_MODEL_TYPES = frozenset({"phi", "gpt_neox"})
KNOWN_MODEL_TYPES = SEQUENTIAL_ROTARY_MODEL_TYPES | PARALLEL_MODEL_TYPES | {"gpt2"}

#: Positions the precomputed cos/sin table may hold (2 x 8.4 MB at head size 64 and float32);
#: a model declaring more keeps its rotary embedding unfused.
MAX_TABLE_POSITIONS = 65536

#: A fused graph's logits must stay this close to the unfused graph's (relative to their size).
_RTOL = 1e-3


def expected_ops(model_type: str, layers: int) -> dict[str, int]:
    """How many fused ops each fusion should make in each graph, for a known model type (the
    report holds the graphs to at least these).

    Two residual normalisations per layer (of the 2 x layers + 1 normalisations, the first of an
    RMSNorm model has no residual before it; GPT-2's has the position embedding's); one
    RotaryEmbedding for the queries and one for the keys per layer (none in GPT-2), one
    GroupQueryAttention, and two packed MatMuls (q/k/v, gate/up; GPT-2 exports its projections
    packed already).

    A parallel layer (Phi, GPT-NeoX) adds one residual per layer, taken by the normalisation
    after it: one per layer (the first layer's has none; the final one's has). Phi's q, k, v
    and fc1 read one normalisation: one packed MatMul per layer; GPT-NeoX's q/k/v is one
    projection already and its MLP reads its own normalisation: nothing to pack.
    """
    if model_type not in KNOWN_MODEL_TYPES:
        return {}
    if model_type in PARALLEL_MODEL_TYPES:
        expected = {"skip-layernorm": layers, "rotary": 2 * layers, "attention": layers}
        if model_type == "phi":
            expected["pack"] = layers
        return expected
    expected = {"skip-layernorm": 2 * layers, "attention": layers}
    if model_type in SEQUENTIAL_ROTARY_MODEL_TYPES:
        expected["rotary"] = 2 * layers
        expected["pack"] = 2 * layers
    return expected


def _rotate(
    op: Any,
    x: Any,
    positions: Any,
    cos: Any,
    sin: Any,
    interleaved: int,
    heads: int,
    rotary_dim: int | None = None,
) -> Any:
    """ONNX Runtime's RotaryEmbedding of ``x`` at ``positions`` from a cos/sin table; with
    ``rotary_dim``, only each head's first ``rotary_dim`` dimensions (partial rotary)."""
    partial = {} if rotary_dim is None else {"rotary_embedding_dim": rotary_dim}
    return op.RotaryEmbedding(
        x,
        positions,
        cos,
        sin,
        interleaved=interleaved,
        num_heads=heads,
        _domain="com.microsoft",
        **partial,
    )


def _rotary_dim(rotated: Any) -> int | None:
    """How many dimensions of each head the RotaryEmbedding making ``rotated`` turns: twice
    its cos table's width (None when the table is not a constant)."""
    from onnxscript.rewriter import _ir_utils

    table = _ir_utils.get_numpy_value(rotated.producer().inputs[2])
    if table is None or table.ndim != 2:
        return None
    return 2 * int(table.shape[1])


def _head_slice(value: Any) -> tuple[int, int] | None:
    """(start, end) of ``value``, a step-1 Slice of axis 3 (or -1) with constant bounds; None
    when it is not one (the attention pattern gives it four axes)."""
    from onnxscript.rewriter import _ir_utils

    node = value.producer()
    if node is None or node.op_type != "Slice" or len(node.inputs) != 5:
        return None
    bounds = [_ir_utils.get_singleton_value(i) for i in node.inputs[1:]]
    if any(b is None for b in bounds):
        return None
    start, end, axis, step = (int(b) for b in bounds)
    return (start, end) if axis in (-1, 3) and step == 1 else None


def _rotary_rule(max_positions: int) -> Any:
    import onnx_ir as ir
    from onnxscript.rewriter import _ir_utils, pattern

    class RotaryTableFusion(pattern.RewriteRuleClassBase):
        """onnxscript's intermediate RotaryEmbedding (x, cos, sin), with cos/sin computed from
        ``position_ids`` elementwise, -> ``com.microsoft.RotaryEmbedding`` with a cos/sin table."""

        def __init__(self) -> None:
            # The angle nodes feed every layer's rotary op: they are left for the final cleanup.
            super().__init__("RotaryTable", remove_nodes=False)
            self.tables: dict[Any, tuple[Any, Any]] = {}

        def pattern(self, op, x, position_ids, axis, inv_freq, interleaved, num_heads):
            positions = op.Cast(op.Unsqueeze(position_ids, axis), to=ir.DataType.FLOAT)
            freqs = op.Mul(positions, inv_freq)
            angles = op.Concat(freqs, freqs, axis=-1)
            cos = op.Unsqueeze(op.Cos(angles), [1])
            sin = op.Unsqueeze(op.Sin(angles), [1])
            return op.RotaryEmbedding(
                x,
                cos,
                sin,
                interleaved=interleaved,
                num_heads=num_heads,
                _domain="ai.onnxruntime._fusion",
            )

        def check(self, context, x, position_ids, axis, inv_freq, **_):
            result = pattern.MatchResult()
            if not _ir_utils.has_rank(position_ids, 2):
                return result.fail("position_ids is not [batch, sequence]", position_ids)
            if not (
                _ir_utils.is_singleton_value(axis, -1) or _ir_utils.is_singleton_value(axis, 2)
            ):
                return result.fail("the positions are not unsqueezed on the last axis", axis)
            if inv_freq.const_value is None or inv_freq.const_value.numpy().ndim != 1:
                return result.fail("inv_freq is not a constant vector", inv_freq)
            if x.dtype != ir.DataType.FLOAT:
                return result.fail("the rotated tensor is not float32", x)
            return result

        def rewrite(self, op, x, position_ids, inv_freq, interleaved, num_heads, **_):
            if inv_freq not in self.tables:
                # float32 products, as PyTorch computes them at run time.
                frequencies = inv_freq.const_value.numpy().astype(np.float32)
                angles = np.arange(max_positions, dtype=np.float32)[:, None] * frequencies[None]
                self.tables[inv_freq] = (
                    op.Constant(value=ir.tensor(np.cos(angles).astype(np.float32))),
                    op.Constant(value=ir.tensor(np.sin(angles).astype(np.float32))),
                )
            cos, sin = self.tables[inv_freq]
            return _rotate(op, x, position_ids, cos, sin, interleaved, num_heads)

    return RotaryTableFusion.rule()


def _heads_first_split_rule() -> Any:
    from onnxscript.rewriter import _ir_utils, pattern

    class HeadsFirstSplit(pattern.RewriteRuleClassBase):
        """GPT-NeoX's packed projection, split into heads before q, k and v -> q, k and v
        each split into heads as the attention rule reads them.

        GPT-NeoX views its query_key_value output as [batch, sequence, heads, 3 x size] (each
        head's query, key and value side by side), moves the heads forward and splits the
        last axis in three. The rewrite splits the same view first, so each of q, k, v is a
        [batch, sequence, hidden] tensor, then reshapes it into heads: exact (the same
        elements, moved), and the attention rule's form. The heads reshape is dead once
        GroupQueryAttention takes the [batch, sequence, hidden] tensors.
        """

        def pattern(self, op, packed, shape):
            view = op.Reshape(packed, shape, _outputs=["view"])
            heads = op.Transpose(view, perm=[0, 2, 1, 3])
            return op.Split(heads, _allow_other_attributes=True, _outputs=["q", "k", "v"])

        def check(self, context, view, q, **_):
            result = pattern.MatchResult()
            split = q.producer()
            # In three equal parts along the size axis: num_outputs, no split sizes.
            axis = split.attributes.get_int("axis", 0)
            # (The pattern's Split has one input: one with sizes does not match.)
            if axis not in (3, -1) or split.attributes.get_int("num_outputs", 0) != 3:
                return result.fail("the heads are not split in three along their size", q)
            heads = _ir_utils.get_dim(view, 2)
            width = _ir_utils.get_dim(view, 3)
            if not (isinstance(heads, int) and isinstance(width, int) and width % 3 == 0):
                return result.fail("the packed heads' count and width are not static", view)
            return result

        def rewrite(self, op, packed, shape, view, **_):
            heads = _ir_utils.get_dim(view, 2)
            size = _ir_utils.get_dim(view, 3) // 3
            parts = op.Split(op.Reshape(packed, shape), axis=3, num_outputs=3, _outputs=3)
            merged = op.Constant(value_ints=[0, 0, heads * size])
            heads_shape = op.Constant(value_ints=[0, 0, heads, size])
            return tuple(
                op.Transpose(op.Reshape(op.Reshape(part, merged), heads_shape), perm=[0, 2, 1, 3])
                for part in parts
            )

    return HeadsFirstSplit.rule()


def _attention_rules() -> list[Any]:
    import onnx_ir as ir
    from onnxscript.rewriter import _ir_utils, pattern

    class LeftPaddedAttention(pattern.RewriteRuleClassBase):
        """A layer's attention, after onnxscript's SDPA fusion, -> GroupQueryAttention.

        ``zeroed``: the exporter zeroes the output of fully masked rows (a Where) -- padding
        queries, whose output nothing reads; ``reshaped``: a no-op Reshape before the heads are
        merged (the decode graph has it); ``rotary``: queries and keys pass a RotaryEmbedding
        (not in GPT-2); ``repeated``: the key/value heads are repeated for grouped queries
        (transformers repeats nothing when there are as many as query heads); ``normed``: each
        query and key head is RMS-normalised before the rotation (Qwen3's q_norm / k_norm, a
        SimplifiedLayerNormalization over the head size; GroupQueryAttention has none, so it
        stays, on the [batch, sequence, heads, size] view); ``partial``: only the first
        dimensions of each head are rotated (Phi's and GPT-NeoX's partial rotary: a Slice of
        the head rotated, concatenated with the rest; ONNX Runtime's RotaryEmbedding does this
        itself given ``rotary_embedding_dim``). One rule per form: onnxscript cannot return
        values behind a choice.
        """

        def __init__(
            self,
            zeroed: bool,
            reshaped: bool,
            rotary: bool,
            repeated: bool,
            normed: bool,
            partial: bool,
            lengths: dict[Any, Any],
        ) -> None:
            flags = (zeroed, reshaped, rotary, repeated, normed, partial)
            form = "".join(str(int(f)) for f in flags)
            super().__init__(f"LeftPaddedAttention{form}", remove_nodes=False)
            self.zeroed, self.reshaped = zeroed, reshaped
            self.rotary, self.repeated, self.normed = rotary, repeated, normed
            self.partial = partial
            # The mask -> (seqlens_k, total_sequence_length), built once per graph.
            self.lengths = lengths

        def pattern(
            self,
            op,
            query,
            key,
            value,
            past_key,
            past_value,
            position_ids,
            cos,
            sin,
            mask,
            rows,
            merged_shape,
            query_scale,
            key_scale,
        ):
            def heads(x, name, scale=None):
                split = op.Reshape(x, pattern.ANY_VALUE, _outputs=[name])
                if scale is not None:
                    split = op.SimplifiedLayerNormalization(
                        split, scale, _allow_other_attributes=True, _outputs=[f"{name}_normed"]
                    )
                return op.Transpose(split, perm=[0, 2, 1, 3])

            def rotated(x, name):
                if not self.rotary:
                    return x
                if not self.partial:
                    return op.RotaryEmbedding(
                        x, position_ids, cos, sin, _domain="com.microsoft", _outputs=[name]
                    )
                # Slice(x, starts, ends, axes, steps): checked to be [:rotary], [rotary:].
                any4 = [pattern.ANY_VALUE] * 4
                part = op.Slice(x, *any4, _outputs=[f"{name}_part"])
                rest = op.Slice(x, *any4, _outputs=[f"{name}_rest"])
                turned = op.RotaryEmbedding(
                    part, position_ids, cos, sin, _domain="com.microsoft", _outputs=[name]
                )
                return op.Concat(turned, rest, axis=-1)

            q = heads(query, "query_heads", query_scale if self.normed else None)
            k = heads(key, "key_heads", key_scale if self.normed else None)
            q, k = rotated(q, "query_rotary"), rotated(k, "key_rotary")
            v = heads(value, "value_heads")
            # The cache: the past concatenated with the new keys (the prefill has no past).
            keys = pattern.OrValue([op.Concat(past_key, k, axis=-2), k])
            values = pattern.OrValue([op.Concat(past_value, v, axis=-2), v])

            def repeated(x):
                if not self.repeated:
                    return x
                expanded = op.Expand(op.Unsqueeze(x, [2]), pattern.ANY_VALUE)
                return op.Reshape(expanded, pattern.ANY_VALUE)

            out = op.SDPA(
                q,
                repeated(keys),
                repeated(values),
                mask,
                _domain="ai.onnxruntime._fusion",
                _allow_other_attributes=True,
                _outputs=["attention"],
            )
            if self.zeroed:
                out = op.Where(rows, 0.0, out)
            if self.reshaped:
                out = op.Reshape(out, pattern.ANY_VALUE)
            merged = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), merged_shape)
            return merged, keys, values

        def check(
            self,
            context,
            query_heads,
            key_heads,
            mask,
            attention,
            query_rotary=None,
            key_rotary=None,
            query_heads_normed=None,
            key_heads_normed=None,
            **pattern_values,
        ):
            result = pattern.MatchResult()
            for normed in (query_heads_normed, key_heads_normed):
                axis = None if normed is None else normed.producer().attributes.get_int("axis", -1)
                if axis not in (None, -1, 3):
                    return result.fail("a head normalisation is not over the head size", normed)
            num_heads = _ir_utils.get_dim(query_heads, 2)
            kv_heads = _ir_utils.get_dim(key_heads, 2)
            head_size = _ir_utils.get_dim(query_heads, 3)
            if not all(isinstance(d, int) for d in (num_heads, kv_heads, head_size)):
                return result.fail("the head counts are not static", query_heads)
            if num_heads % kv_heads or head_size % 8:
                return result.fail(
                    "GroupQueryAttention needs kv heads dividing heads, head size % 8"
                )
            if (
                mask.shape is None
                or len(mask.shape) != 4
                or mask.dtype != ir.DataType.FLOAT
                or mask.shape[1] != 1
                or query_heads.shape is None
                or mask.shape[2] != query_heads.shape[1]
            ):
                # GroupQueryAttention takes [batch or 1, 1, query, key] as attention_bias.
                return result.fail("the mask is not a float [batch, 1, query, key] bias", mask)
            form = attention.producer().attributes.get_string("key_format", "BHSd")
            if form != "BHSd":
                return result.fail(f"the keys come as {form}, not [batch, heads, key, size]")
            if not self.repeated and num_heads != kv_heads:
                return result.fail("fewer key/value heads than heads, but none repeated")
            if self.rotary:
                q_attrs = query_rotary.producer().attributes
                k_attrs = key_rotary.producer().attributes
                if q_attrs.get_int("interleaved", 0) != k_attrs.get_int("interleaved", 0):
                    return result.fail("queries and keys rotate differently", query_rotary)
            if self.partial:
                # The rest may be empty: a partial factor of 1 still slices (at the head size).
                rotary_dim = _rotary_dim(query_rotary)
                if rotary_dim is None or rotary_dim > head_size:
                    return result.fail("the rotated part is not within a head", query_rotary)
                for name in ("query_rotary", "key_rotary"):
                    rest = _head_slice(pattern_values[f"{name}_rest"])
                    part = pattern_values[f"{name}_part"]
                    if _head_slice(part) != (0, rotary_dim) or not (
                        rest and rest[0] == rotary_dim and rest[1] >= head_size
                    ):
                        return result.fail(f"a head is not split at {rotary_dim}", part)
            return result

        def rewrite(self, op, **v):
            # ``v``: the pattern's values, by the names pattern() gives them.
            query, key, mask = v["query"], v["key"], v["mask"]
            num_heads = _ir_utils.get_dim(v["query_heads"], 2)
            kv_heads = _ir_utils.get_dim(v["key_heads"], 2)
            if mask not in self.lengths:
                # Every row spans the whole mask: padding is masked by the bias, not by length.
                total = op.Shape(mask, start=3, end=4)
                one = op.Constant(value_ints=[1])
                seqlens = op.Expand(
                    op.Cast(op.Sub(total, one), to=ir.DataType.INT32),
                    op.Shape(query, start=0, end=1),
                )
                width = op.Squeeze(
                    op.Cast(total, to=ir.DataType.INT32), op.Constant(value_ints=[0])
                )
                self.lengths[mask] = (seqlens, width)
            seqlens, width = self.lengths[mask]
            q, k = query, key
            if self.normed:
                # The normalised heads, merged back to [batch, sequence, hidden].
                merge = op.Constant(value_ints=[0, 0, -1])
                q = op.Reshape(v["query_heads_normed"], merge)
                k = op.Reshape(v["key_heads_normed"], merge)
            if self.rotary:
                # RotaryEmbedding takes [batch, sequence, hidden] with num_heads as well.
                interleaved = v["query_rotary"].producer().attributes.get_int("interleaved", 0)
                table = (v["position_ids"], v["cos"], v["sin"], interleaved)
                rotary_dim = _rotary_dim(v["query_rotary"]) if self.partial else None
                if rotary_dim == _ir_utils.get_dim(v["query_heads"], 3):
                    rotary_dim = None  # the whole head
                q = _rotate(op, q, *table, num_heads, rotary_dim)
                k = _rotate(op, k, *table, kv_heads, rotary_dim)
            attributes = {"num_heads": num_heads, "kv_num_heads": kv_heads}
            scale = v["attention"].producer().attributes.get_float("scale", None)
            if scale is not None:
                attributes["scale"] = scale
            out, present_key, present_value = op.GroupQueryAttention(
                q,
                k,
                v["value"],
                v["past_key"],
                v["past_value"],
                seqlens,
                width,
                None,  # cos_cache, sin_cache, position_ids: rotated above
                None,
                None,
                mask,  # attention_bias
                _domain="com.microsoft",
                _outputs=3,
                **attributes,
            )
            # The op gives [batch, sequence, hidden]; GPT-2's merge reshapes straight to the
            # [batch * sequence, hidden] its Gemm projection takes, so that shape is kept.
            shape = v["merged_shape"].const_value
            if shape is None or len(shape.numpy()) != 3:
                out = op.Reshape(out, v["merged_shape"])
            return out, present_key, present_value

    lengths: dict[Any, Any] = {}
    return [
        LeftPaddedAttention.rule(zeroed, reshaped, rotary, repeated, normed, partial, lengths)
        for rotary, partial in ((True, False), (True, True), (False, False))
        for repeated in (True, False)
        for zeroed in (True, False)
        for reshaped in (True, False)
        for normed in (False, True)
    ]


def pack_projections(
    model: Any, separate: Callable[[Any], bool] = lambda node: False
) -> tuple[int, int]:
    """Turn the MatMuls that read one value with constant ``[in, out]`` weights (an attention's
    query, key and value projections; an MLP's gate and up ones) into one MatMul with the
    weights concatenated and a Split of its output: one kernel, one pass over the input, for
    several. A group any of whose MatMuls ``separate`` names is left alone (quantize.exclude
    keeps those in float, and a packed weight is quantized whole). Returns (groups packed,
    groups kept apart).
    """
    import onnx_ir as ir

    graph = model.graph
    # Graph order, so the packed columns (and so the bytes) are the same in every graph.
    order = {node: index for index, node in enumerate(graph)}
    packed = apart = 0
    for value in [*graph.inputs, *(o for node in list(graph) for o in node.outputs)]:
        siblings = sorted(
            (
                use.node
                for use in value.uses()
                if use.node.op_type == "MatMul"
                and use.node.domain == ""
                and use.node.graph is graph
                and use.idx == 0
                and use.node.inputs[1] is not None
                and use.node.inputs[1].const_value is not None
                # A weight that is also a graph input can be replaced at run time.
                and not use.node.inputs[1].is_graph_input()
            ),
            key=lambda node: order.get(node, len(order)),
        )
        if len(siblings) < 2 or any(node.outputs[0].is_graph_output() for node in siblings):
            continue
        weights = [node.inputs[1].const_value.numpy() for node in siblings]
        if len({(w.ndim, w.shape[0], w.dtype) for w in weights}) != 1 or weights[0].ndim != 2:
            continue
        if any(separate(node) for node in siblings):
            apart += 1
            continue
        first = siblings[0]
        name = first.name or "projection"
        while f"{name}.packed_weight" in graph.initializers:
            name += "_"
        constants = []
        for suffix, array in (
            ("packed_weight", np.concatenate(weights, 1)),
            ("packed_sizes", np.array([w.shape[1] for w in weights], dtype=np.int64)),
        ):
            tensor = ir.tensor(array)
            constant = ir.Value(
                name=f"{name}.{suffix}",
                shape=ir.Shape(array.shape),
                type=ir.TensorType(tensor.dtype),
                const_value=tensor,
            )
            graph.register_initializer(constant)
            constants.append(constant)
        weight, sizes = constants
        matmul = ir.node("MatMul", [value, weight], name=f"{name}.packed")
        # The packed node keeps the first projection's scope metadata (its module name).
        matmul.metadata_props.update(first.metadata_props)
        split = ir.node(
            "Split",
            [matmul.outputs[0], sizes],
            attributes={"axis": -1},
            num_outputs=len(siblings),
            name=f"{name}.packed_split",
        )
        matmul.outputs[0].dtype = first.outputs[0].dtype
        graph.insert_before(first, [matmul, split])
        for node, output in zip(siblings, split.outputs, strict=True):
            old = node.outputs[0]
            output.dtype, output.shape = old.dtype, old.shape
            old.replace_all_uses_with(output)
            taken, old.name = old.name, f"{old.name}.unpacked"
            output.name = taken
        graph.remove(siblings, safe=True)
        packed += 1
    return packed, apart


def separated(patterns: Sequence[str]) -> Callable[[Any], bool]:
    """Whether a node is one ``patterns`` (quantize.exclude: modules, shell patterns of them,
    or node names) keeps apart."""
    from pipeline.decoders.quantize import matches
    from pipeline.sensitivity import module_name

    def named(node: Any) -> bool:
        module = module_name(node) or ""
        return any(matches(p, node, module) for p in patterns)

    return named


def fuse_graph(
    model: Any,
    fusions: Sequence[str],
    max_positions: int | None,
    separate: Sequence[str] = (),
) -> dict[str, int]:
    """Apply ``fusions`` to an ``onnx_ir`` model in place; returns each rule's match count.
    ``separate``: patterns of projections the ``pack`` fusion leaves unpacked."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import _fusion_utils, pattern
    from onnxscript.rewriter.ort_fusions import shape_optimization
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.skip_normalization import (
        fuse_skip_layer_normalization,
        fuse_skip_rms_normalization,
    )

    # The rules need shapes and folded shape arithmetic (onnxscript's own preparation).
    common_passes.ShapeInferencePass()(model)
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)
    matched: dict[str, int] = {}
    if "skip-layernorm" in fusions:
        matched["rms_normalization"] = fuse_rms_normalization(model)
        matched["skip_rms_normalization"] = fuse_skip_rms_normalization(model)
        matched["skip_layer_normalization"] = fuse_skip_layer_normalization(model)
    if "rotary" in fusions and max_positions:
        matched["rotary_embedding"] = fuse_rotary_embedding(model)
        table = pattern.RewriteRuleSet([_rotary_rule(max_positions)])
        matched["rotary_table"] = _fusion_utils.apply_fusion_rules(table)(model)
        if not matched["rotary_table"] and any(n.op_type == "Cos" for n in model.graph):
            # The graph computes cos/sin (GPT-2's has none to fuse), and no rule took them.
            raise ValueError(
                "no rotary rule matched its rotary embedding (a scaled form that multiplies "
                "cos/sin, as YaRN's attention scaling, has none)"
            )
    if "attention" in fusions:
        # SDPA (onnxscript's intermediate op) first, then the rule that consumes it.
        split = pattern.RewriteRuleSet([_heads_first_split_rule()])
        matched["heads_first_split"] = _fusion_utils.apply_fusion_rules(split)(model)
        matched["sdpa"] = fuse_sdpa(model, apply_shape_inference=True)
        rules = pattern.RewriteRuleSet(_attention_rules())
        matched["group_query_attention"] = _fusion_utils.apply_fusion_rules(rules)(model)
        left = sum(1 for n in model.graph if n.op_type == "SDPA")
        if left:
            # onnxscript's SDPA is no function to inline back: a layer the rule did not take
            # would leave an op no runtime knows.
            raise ValueError(
                f"the attention rule took {matched['group_query_attention']} layers and left "
                f"{left}: a layer's attention has another form (a rotary model's needs the "
                "rotary fusion; one that normalises its query and key heads, as Qwen3 does, "
                "the skip-layernorm fusion too)"
            )
    if "pack" in fusions:
        packed, apart = pack_projections(model, separated(separate))
        matched["packed_projections"], matched["projections_kept_apart"] = packed, apart
    # Inlines any intermediate fusion that nothing consumed, and drops the dead nodes; the
    # attention rule's shared length nodes were placed at its first match, so sort.
    optimize(model)
    common_passes.TopologicalSortPass()(model)
    return matched


def fused_ops(folder: Path) -> dict[str, dict[str, int]]:
    """Per graph, how many of each fused op it holds."""
    import onnx

    ops = [op for made in FUSED_BY.values() for op in made]
    counts = {}
    for name in (PREFILL, DECODE):
        graph = onnx.load(str(folder / name), load_external_data=False).graph
        by_type = Counter(node.op_type for node in graph.node)
        found = {op: by_type[op] for op in ops if by_type[op]}
        packed = sum(1 for n in graph.node if n.op_type == "MatMul" and n.name.endswith(".packed"))
        if packed:
            found[PACKED] = packed
        counts[name.removesuffix(".onnx")] = found
    return counts


def _write(
    source: Path,
    out: Path,
    fusions: Sequence[str],
    max_positions: int | None,
    separate: Sequence[str] = (),
) -> dict[str, dict[str, int]]:
    """Write the fused graphs into ``out``; returns each graph's rule matches."""
    import onnx_ir as ir

    out.mkdir(parents=True)
    if not fusions:
        for item in source.iterdir():
            if item.name.startswith((PREFILL, DECODE, WEIGHTS)):
                shutil.copyfile(item, out / item.name)
        return {}
    matched = {}
    for name in (PREFILL, DECODE):
        model = ir.load(source / name)
        matched[name.removesuffix(".onnx")] = fuse_graph(model, fusions, max_positions, separate)
        ir.save(model, out / name, external_data=f"{name}.data")
        del model
    share_weights(out)
    return matched


def _sample(vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The check's input: two prompts of 7 tokens, the second left-padded by 3, and the two
    tokens fed back (the prefill, then one decode step with the cache)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, max(vocab_size, 4), size=(2, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask, np.full((2, 2), 3, dtype=np.int64)


def _logits(folder: Path, sample: tuple[np.ndarray, ...], level: str) -> list[np.ndarray]:
    from pipeline.decoders.generate import OrtGenerator

    ids, mask, forced = sample
    return OrtGenerator(folder, 1, level).step_logits(ids, mask, forced, forced.shape[1]).logits


def _compare(
    reference: list[np.ndarray], folder: Path, sample: tuple[np.ndarray, ...], level: str
) -> str | None:
    """Why the graphs in ``folder`` cannot replace the unfused ones, or None when they can."""
    try:
        logits = _logits(folder, sample, level)
    # ONNX Runtime raises its own exception types (Fail, InvalidGraph, RuntimeException...).
    except Exception as error:
        return f"ONNX Runtime could not run it: {first_line(error)}"
    for step, (want, got) in enumerate(zip(reference, logits, strict=True)):
        scale = max(1.0, float(np.abs(want).max()))
        difference = float(np.abs(want - got).max())
        if not np.isfinite(difference) or difference > _RTOL * scale:
            return f"its logits differ from the unfused graph's by {difference:.3g} at step {step}"
    return None


def fuse_decoder(
    source: Path,
    out: Path,
    fusions: Sequence[str],
    max_positions: int | None,
    vocab_size: int,
    session_optimization: str = "all",
    separate: Sequence[str] = (),
) -> dict[str, Any]:
    """Fuse both graphs of the decoder in ``source`` into ``out`` (other files copied).
    ``separate``: projections (quantize.exclude patterns) the ``pack`` fusion leaves apart.

    Returns the fusions kept, those dropped with the reason (``fallback``), the fused ops and
    the rules' matches per graph. Each candidate set is written to a temporary folder beside ``out`` and run;
    the kept one becomes ``out``, and nothing else is left beside it.
    """
    sample = _sample(vocab_size)
    reference = _logits(source, sample, session_optimization)
    fallback: dict[str, str] = {}
    if "rotary" in fusions and not max_positions:
        fallback["rotary"] = "the model declares no maximum position: no cos/sin table size"
    elif "rotary" in fusions and max_positions and max_positions > MAX_TABLE_POSITIONS:
        fallback["rotary"] = (
            f"a cos/sin table for {max_positions} positions is over the {MAX_TABLE_POSITIONS} "
            "tforge precomputes"
        )
    if "attention" in fusions and "rotary" in fallback:
        fallback["attention"] = "it needs the rotary fusion (its pattern starts at RotaryEmbedding)"
    wanted = [f for f in DECODER_FUSIONS if f in fusions and f not in fallback]
    out.parent.mkdir(parents=True, exist_ok=True)

    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))

    matches: dict[Path, dict[str, dict[str, int]]] = {}

    def attempt(chosen: Sequence[str]) -> tuple[Path, str | None]:
        work = Path(tempfile.mkdtemp(dir=scratch)) / "model"
        try:
            matches[work] = _write(source, work, chosen, max_positions, separate)
        # The rewriter raises whatever a rule or onnx_ir raises on a graph it did not expect.
        except Exception as error:
            return work, f"the rewriter failed: {first_line(error)}"
        return work, _compare(reference, work, sample, session_optimization)

    try:
        work, problem = attempt(wanted)
        if problem is not None:
            # Find the fusion at fault: add them one at a time, keeping each that still runs.
            # (A decoder's graphs are large: each trial is removed once it is not needed.)
            shutil.rmtree(work.parent)
            kept: list[str] = []
            for fusion in wanted:
                if fusion == "attention" and "rotary" in fallback:
                    fallback[fusion] = "it needs the rotary fusion, which was dropped"
                    continue
                trial, why = attempt([*kept, fusion])
                if why is None:
                    if kept:
                        shutil.rmtree(work.parent)
                    kept.append(fusion)
                    work = trial
                else:
                    fallback[fusion] = why
                    shutil.rmtree(trial.parent)
            wanted = kept
            if not kept:
                work = Path(tempfile.mkdtemp(dir=scratch)) / "model"
                _write(source, work, [], max_positions)
        for fusion, why in fallback.items():
            log.warning("decoder fusion %s dropped: %s", fusion, why)
        for item in source.iterdir():
            if item.is_file() and not item.name.startswith((PREFILL, DECODE, WEIGHTS)):
                shutil.copyfile(item, work / item.name)
        if out.exists():
            out.rmdir()  # an empty folder to write into; anything else is refused here
        work.replace(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "kept": wanted,
        "fallback": fallback,
        "fused_ops": fused_ops(out),
        "matched": matches.get(work, {}),
    }
