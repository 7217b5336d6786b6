"""Decoder fusions: normalisations, rotary embeddings and attention fused, counted, run against
PyTorch.

Tiny random-weight GPT-2, Llama, Qwen2, Qwen3, Phi and GPT-NeoX models
(tests/decoders/test_generation.py): each family's fused graphs must hold the ops its
architecture should give and generate PyTorch's tokens on a left-padded batch; a fusion ONNX
Runtime cannot run is dropped, with its reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from pipeline.decoders import OrtGenerator, compare_generation, export_decoder, greedy_reference
from pipeline.decoders.fuse import PACKED, expected_ops, fuse_decoder
from pipeline.sensitivity import module_name
from tests.decoders.test_generation import FAMILIES, VOCAB, prompts, tiny

FUSIONS = ("skip-layernorm", "rotary", "attention", "pack")


@pytest.fixture(scope="module", params=FAMILIES)
def fused(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path, dict[str, Any]]:
    model = tiny(request.param)
    root = tmp_path_factory.mktemp(request.param)
    graphs = export_decoder(model, root / "export")
    result = fuse_decoder(graphs.folder, root / "fused", FUSIONS, 128, VOCAB)
    return model, root, result


def test_each_family_gets_the_fused_ops_its_architecture_should(
    fused: tuple[Any, Path, dict[str, Any]],
) -> None:
    model, root, result = fused
    layers = model.config.num_hidden_layers
    family = model.config.model_type
    expected = expected_ops(family, layers)
    assert result["fallback"] == {}
    rotary = family != "gpt2"
    parallel = family in ("phi", "gpt_neox")
    if parallel:
        # One residual normalisation per layer; Phi packs q/k/v with fc1, GPT-NeoX has nothing
        # to pack (its q/k/v come packed, its MLP reads its own norm).
        assert expected == {
            "skip-layernorm": layers,
            "rotary": 2 * layers,
            "attention": layers,
            **({"pack": layers} if family == "phi" else {}),
        }
    else:
        assert expected == {
            "skip-layernorm": 2 * layers,
            "attention": layers,
            **({"rotary": 2 * layers, "pack": 2 * layers} if rotary else {}),
        }
    for graph in ("prefill", "decode"):
        ops = result["fused_ops"][graph]
        if parallel:
            # LayerNorm: the first layer's norms (one in Phi, two in GPT-NeoX) have no residual
            # before them, and of GPT-NeoX's two later ones only one can take it.
            assert ops == {
                "SkipLayerNormalization": layers,
                "RotaryEmbedding": 2 * layers,
                "GroupQueryAttention": layers,
                **({PACKED: layers} if family == "phi" else {}),
            }
        elif rotary:
            # RMSNorm: the first normalisation has no residual before it; Qwen3 normalises
            # each query and key head too (two per layer, on the heads' own view).
            heads = 2 * layers if model.config.model_type == "qwen3" else 0
            assert ops["SimplifiedLayerNormalization"] == 1 + heads
            assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
            assert ops["RotaryEmbedding"] == 2 * layers
            # One op per layer takes the cache in and gives the new one out.
            assert ops["GroupQueryAttention"] == layers
            # q/k/v and gate/up: one MatMul each per layer (o, down and the head stay alone).
            assert ops[PACKED] == 2 * layers
        else:
            # GPT-2: LayerNorms, and attention without rotary (as many key/value heads as heads).
            assert ops == {"SkipLayerNormalization": 2 * layers + 1, "GroupQueryAttention": layers}
        nodes = onnx.load(str(root / "fused" / f"{graph}.onnx"), load_external_data=False).graph
        unfused = onnx.load(str(root / "export" / f"{graph}.onnx"), load_external_data=False)
        # The rotate-half plumbing and the RMSNorm arithmetic are gone.
        assert len(nodes.node) < len(unfused.graph.node)
        gone = ("Neg", "Sqrt", "Reciprocal", "Softmax", "Transpose") if rotary else ("Softmax",)
        assert not any(n.op_type in gone for n in nodes.node)
        if parallel:
            # Each head's rotated part: a half (Phi) or a quarter (GPT-NeoX) of its 8.
            width = {"phi": 4, "gpt_neox": 2}[family]
            turned = [
                next(a.i for a in n.attribute if a.name == "rotary_embedding_dim")
                for n in nodes.node
                if n.op_type == "RotaryEmbedding"
            ]
            assert turned == [width] * 2 * layers
        attention = [n for n in nodes.node if n.op_type == "GroupQueryAttention"]
        # The cache tensors are the op's own outputs, under their stable names.
        assert {o for n in attention for o in n.output[1:]} == {
            f"present.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")
        }
    # Both graphs still read one weights file, and the tokenizer and config came along.
    names = {p.name for p in (root / "fused").iterdir()}
    assert {"prefill.onnx", "decode.onnx", "weights.onnx.data", "config.json"} <= names
    assert not any(n.endswith(".onnx.data") and n != "weights.onnx.data" for n in names)


def test_fused_graphs_generate_pytorchs_tokens_on_a_padded_batch(
    fused: tuple[Any, Path, dict[str, Any]],
) -> None:
    model, root, _ = fused
    ids, mask = prompts()
    reference = greedy_reference(model, ids, mask, 8)
    unfused = OrtGenerator(root / "export").step_logits(ids, mask, reference.tokens, 8)
    fused_run = OrtGenerator(root / "fused").step_logits(ids, mask, reference.tokens, 8)
    assert (OrtGenerator(root / "fused").generate(ids, mask, 8).tokens == reference.tokens).all()
    for want, plain, got in zip(reference.logits, unfused.logits, fused_run.logits, strict=True):
        assert np.abs(got - want).max() < 1e-4
        # Fusing changes the arithmetic's order only.
        assert np.abs(got - plain).max() < 1e-5


def test_fused_graphs_are_compared_with_the_unfused_ones_step_by_step(
    fused: tuple[Any, Path, dict[str, Any]],
) -> None:
    """The comparison that decides whether a fusion is kept (``_compare``): the fused graphs'
    logits against given unfused logits, relative to their scale, at every step; here fed
    references altered on purpose."""
    from pipeline.decoders.fuse import _RTOL, _compare, _logits, _sample

    _, root, _ = fused
    sample = _sample(VOCAB)
    reference = _logits(root / "export", sample, "all")
    assert len(reference) == 2  # the prefill, then one decode step with the cache
    assert _compare(reference, root / "fused", sample, "all") is None
    scale = max(1.0, float(np.abs(reference[1]).max()))
    off = [reference[0], reference[1] + 10 * _RTOL * scale]
    problem = _compare(off, root / "fused", sample, "all")
    assert problem is not None and problem.startswith("its logits differ from the unfused graph's")
    assert problem.endswith("at step 1")
    assert float(problem.split(" by ")[1].split()[0]) == pytest.approx(10 * _RTOL * scale, rel=1e-2)
    broken = [np.full_like(reference[0], np.nan), reference[1]]
    problem = _compare(broken, root / "fused", sample, "all")
    assert problem is not None and problem.endswith("by nan at step 0")


def _rotary_dropped(model: Any, result: dict[str, Any], folder: Path) -> None:
    """Rotary and the attention that needs it dropped, the other fusions kept, and the graphs
    in ``folder`` generating PyTorch's tokens."""
    assert result["kept"] == ["skip-layernorm", "pack"]
    assert "needs the rotary fusion" in result["fallback"]["attention"]
    assert "RotaryEmbedding" not in result["fused_ops"]["decode"]
    assert result["fused_ops"]["decode"]["SkipSimplifiedLayerNormalization"] == 4
    ids, mask = prompts()
    reference = greedy_reference(model, ids, mask, 6)
    assert (OrtGenerator(folder).generate(ids, mask, 6).tokens == reference.tokens).all()


def test_a_rotary_table_too_short_for_the_positions_is_dropped_with_its_reason(
    tmp_path: Path,
) -> None:
    model = tiny("llama")
    graphs = export_decoder(model, tmp_path / "export")
    # 4 positions cannot hold the check's sample (7 prompt tokens + 2 steps): ONNX Runtime's
    # RotaryEmbedding refuses a position past its table, so the fusion must fall back.
    result = fuse_decoder(graphs.folder, tmp_path / "fused", FUSIONS, 4, VOCAB)
    assert "ONNX Runtime could not run it" in result["fallback"]["rotary"]
    _rotary_dropped(model, result, tmp_path / "fused")
    # Nothing half-written beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "fused"]


def test_without_a_maximum_position_rotary_is_not_attempted(tmp_path: Path) -> None:
    graphs = export_decoder(tiny("qwen2"), tmp_path / "export")
    result = fuse_decoder(graphs.folder, tmp_path / "fused", FUSIONS, None, VOCAB)
    assert "no maximum position" in result["fallback"]["rotary"]
    assert result["kept"] == ["skip-layernorm", "pack"]


def test_a_scaled_rotary_embedding_is_left_unfused_with_its_reason(tmp_path: Path) -> None:
    """YaRN multiplies cos/sin by an attention scaling: no rotary rule matches it. Rotary and
    attention are dropped, saying why, not kept with nothing fused."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    base = tiny("qwen3").config.to_dict()
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    config = Qwen3Config(**{**base, "rope_parameters": {**base["rope_parameters"], **yarn}})
    model = Qwen3ForCausalLM(config).eval()
    assert model.model.rotary_emb.attention_scaling > 1
    graphs = export_decoder(model, tmp_path / "export")
    result = fuse_decoder(graphs.folder, tmp_path / "fused", FUSIONS, 128, VOCAB)
    assert "no rotary rule matched its rotary embedding" in result["fallback"]["rotary"]
    _rotary_dropped(model, result, tmp_path / "fused")


def test_qwen3s_attention_needs_its_head_normalisations_fused(tmp_path: Path) -> None:
    """The attention rule reads Qwen3's query/key normalisations as the
    SimplifiedLayerNormalization that skip-layernorm makes: without it, attention is dropped
    and the reason names it."""
    graphs = export_decoder(tiny("qwen3"), tmp_path / "export")
    result = fuse_decoder(graphs.folder, tmp_path / "fused", ("rotary", "attention"), 128, VOCAB)
    assert result["kept"] == ["rotary"]
    assert "the skip-layernorm fusion too" in result["fallback"]["attention"]
    assert result["fused_ops"]["decode"] == {"RotaryEmbedding": 4}


@pytest.mark.parametrize(("family", "fused"), [("gpt2", True), ("llama", False)])
def test_attention_without_the_rotary_fusion(family: str, fused: bool, tmp_path: Path) -> None:
    """GPT-2 has no rotary embedding: its attention fuses alone. A rotary model's attention
    cannot be taken without its rotary ops fused first: dropped, and the reason says so (the
    layers are left unfused, not half rewritten)."""
    graphs = export_decoder(tiny(family), tmp_path / "export")
    result = fuse_decoder(graphs.folder, tmp_path / "fused", ("attention",), 128, VOCAB)
    if fused:
        assert result["fallback"] == {} and result["kept"] == ["attention"]
        assert result["fused_ops"]["decode"] == {"GroupQueryAttention": 2}
    else:
        assert result["kept"] == []
        assert "needs the rotary fusion" in result["fallback"]["attention"]
        assert result["fused_ops"]["decode"] == {}


def test_a_non_default_attention_scale_is_kept(tmp_path: Path) -> None:
    """GPT-2 with scale_attn_by_inverse_layer_idx scales layer i's scores by 1/(i+1) beyond
    1/sqrt(head size): each fused layer must carry its own scale."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=128,
        scale_attn_by_inverse_layer_idx=True,
    )
    model = GPT2LMHeadModel(config).eval()
    graphs = export_decoder(model, tmp_path / "export")
    result = fuse_decoder(graphs.folder, tmp_path / "fused", FUSIONS, 128, VOCAB)
    assert result["fallback"] == {}
    decode = onnx.load(str(tmp_path / "fused" / "decode.onnx"), load_external_data=False)
    head = 32 // 4
    # Without a scale attribute GroupQueryAttention scales by 1/sqrt(head size).
    scales = [
        next((a.f for a in n.attribute if a.name == "scale"), head**-0.5)
        for n in decode.graph.node
        if n.op_type == "GroupQueryAttention"
    ]
    assert scales == pytest.approx([head**-0.5, head**-0.5 / 2])
    ids, mask = prompts()
    reference = greedy_reference(model, ids, mask, 6)
    run = OrtGenerator(tmp_path / "fused").step_logits(ids, mask, reference.tokens, 6)
    assert (
        max(np.abs(a - b).max() for a, b in zip(run.logits, reference.logits, strict=True)) < 1e-4
    )


def test_unknown_architectures_expect_nothing() -> None:
    assert expected_ops("mamba", 4) == {}
    assert expected_ops("llama", 3) == {
        "skip-layernorm": 6,
        "rotary": 6,
        "attention": 3,
        "pack": 6,
    }
    assert expected_ops("gpt2", 3) == {"skip-layernorm": 6, "attention": 3}
    assert expected_ops("qwen3", 3) == expected_ops("llama", 3)
    assert expected_ops("phi", 3) == {"skip-layernorm": 3, "rotary": 6, "attention": 3, "pack": 3}
    assert expected_ops("gpt_neox", 3) == {"skip-layernorm": 3, "rotary": 6, "attention": 3}
    # Untested layouts are fused and run-checked, but not held to counts.
    assert expected_ops("smollm3", 3) == {}


def test_excluded_projections_are_not_packed(tmp_path: Path) -> None:
    """A projection quantize.exclude keeps in float stays its own MatMul, with its siblings
    (a packed weight is quantized whole); the other layers are packed."""
    model = tiny("llama")
    graphs = export_decoder(model, tmp_path / "export")
    result = fuse_decoder(
        graphs.folder,
        tmp_path / "fused",
        FUSIONS,
        128,
        VOCAB,
        separate=("layers.0.self_attn.k_proj",),
    )
    assert result["fused_ops"]["decode"][PACKED] == 2 * model.config.num_hidden_layers - 1
    assert result["matched"]["decode"]["projections_kept_apart"] == 1
    decode = onnx.load(str(tmp_path / "fused" / "decode.onnx"), load_external_data=False)
    alone = {
        module_name(n)
        for n in decode.graph.node
        if n.op_type == "MatMul" and not n.name.endswith(".packed")
    }
    assert {f"layers.0.self_attn.{p}_proj" for p in "qkv"} <= alone
    assert "layers.1.self_attn.q_proj" not in alone
    ids, mask = prompts()
    reference = greedy_reference(model, ids, mask, 6)
    assert (
        OrtGenerator(tmp_path / "fused").generate(ids, mask, 6).tokens == reference.tokens
    ).all()


@pytest.mark.parametrize("graphs", ["fused", "export"])
def test_float16_decoders_generate_close_to_pytorch(
    fused: tuple[Any, Path, dict[str, Any]], graphs: str, tmp_path: Path
) -> None:
    """Weights, activations and the KV cache in float16; ids, mask and logits as they were."""
    from pipeline.decoders.half import half_decoder

    model, root, _ = fused
    layers = model.config.num_hidden_layers
    stats = half_decoder(root / graphs, tmp_path / "half")
    # The cache is float16 everywhere: the prefill's outputs, the decode step's inputs and outputs.
    assert stats["prefill"]["cache"] == {"FLOAT16": 2 * layers}
    assert stats["decode"]["cache"] == {"FLOAT16": 4 * layers}
    decode = onnx.load(str(tmp_path / "half" / "decode.onnx"), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*decode.input, *decode.output)}
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert types["input_ids"] == types["attention_mask"] == onnx.TensorProto.INT64
    weights = [i for i in decode.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    if graphs == "fused":
        # Fused normalisations and attention take float16 as they are; only the tanh GELU of
        # GPT-2 and Phi keeps its cube (Pow) in float32.
        gelu = {"Pow": layers} if model.config.model_type in ("gpt2", "phi") else {}
        assert stats["decode"]["kept_float"] == gelu
    else:
        # The exported graph's Softmax (and RMSNorm's Pow and ReduceMean) stay float32.
        assert stats["decode"]["kept_float"].get("Softmax") == layers
    ids, mask = prompts()
    reference = greedy_reference(model, ids, mask, 12)
    figures = compare_generation(OrtGenerator(tmp_path / "half"), reference, ids, mask)
    spread = float(np.std(np.concatenate(reference.logits)))
    assert figures["nonfinite_outputs"] == 0
    assert figures["token_match"] >= 0.95
    # float16's 11-bit significand: an error far below the logits' spread, but not none.
    assert 0 < figures["mean_abs_error"] < 2e-3 * spread, (figures, spread)


def _ir_model(nodes: list[Any], inputs: list[Any], outputs: list[str]) -> Any:
    """An onnx_ir model of ``nodes`` (opset 21), shapes inferred, and its ONNX bytes."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model = ir.serde.deserialize_model(proto)
    common_passes.ShapeInferencePass()(model)
    return model, proto.SerializeToString()


@pytest.mark.parametrize(
    ("axis", "parts", "rewritten"), [(3, 3, True), (-1, 3, True), (2, 3, False), (3, 4, False)]
)
def test_heads_first_split_is_exact_and_only_where_it_applies(
    axis: int, parts: int, rewritten: bool
) -> None:
    """GPT-NeoX's q/k/v packed head by head (a [batch, sequence, heads, 3 x size] view, heads
    moved forward, then split in three) -> split first, then each part made heads: the same
    values. A split along another axis, or in other than three, is left as it is."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxscript.rewriter import _fusion_utils, pattern

    from pipeline.decoders.fuse import _heads_first_split_rule

    heads, width = 3, 12
    names = [f"part{i}" for i in range(parts)]
    nodes = [
        helper.make_node("Constant", [], ["shape"], value_ints=[0, 0, heads, width]),
        helper.make_node("Reshape", ["packed", "shape"], ["view"]),
        helper.make_node("Transpose", ["view"], ["heads"], perm=[0, 2, 1, 3]),
        helper.make_node("Split", ["heads"], names, axis=axis, num_outputs=parts),
        *(helper.make_node("Identity", [n], [f"out{i}"]) for i, n in enumerate(names)),
    ]
    packed = helper.make_tensor_value_info("packed", TensorProto.FLOAT, [2, 5, heads * width])
    outputs = [f"out{i}" for i in range(parts)]
    model, before = _ir_model(nodes, [packed], outputs)
    rules = pattern.RewriteRuleSet([_heads_first_split_rule()])
    assert _fusion_utils.apply_fusion_rules(rules)(model) == int(rewritten)
    after = ir.serde.serialize_model(model).SerializeToString()
    feed = {"packed": np.random.default_rng(0).standard_normal((2, 5, 36)).astype(np.float32)}
    runs = [
        ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(outputs, feed)
        for m in (before, after)
    ]
    for want, got in zip(*runs, strict=True):
        assert want.shape == got.shape and np.array_equal(want, got)
    # Rewritten: the Split reads the [batch, sequence, heads, 3 x size] view itself.
    split = next(n for n in model.graph if n.op_type == "Split")
    assert (split.inputs[0].producer().op_type == "Reshape") == rewritten


def test_a_head_slice_is_read_only_from_constant_unit_step_bounds_on_the_last_axis() -> None:
    """The partial-rotary check's reading of a Slice: (start, end) where the bounds are
    constants on axis 3 (or -1) with step 1, else nothing."""
    from onnx import TensorProto, helper

    from pipeline.decoders.fuse import _head_slice

    def sliced(start: int, end: int, axis: int, step: int, dynamic: bool = False) -> Any:
        bounds = {"s": start, "e": end, "a": axis, "p": step}
        nodes = [
            helper.make_node("Constant", [], [k], value_ints=[v])
            for k, v in bounds.items()
            if not (dynamic and k == "s")
        ]
        nodes.append(helper.make_node("Slice", ["x", "s", "e", "a", "p"], ["y"]))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 8])]
        if dynamic:
            inputs.append(helper.make_tensor_value_info("s", TensorProto.INT64, [1]))
        model, _ = _ir_model(nodes, inputs, ["y"])
        return next(n for n in model.graph if n.op_type == "Slice").outputs[0]

    assert _head_slice(sliced(0, 4, 3, 1)) == (0, 4)
    assert _head_slice(sliced(4, 2**62, -1, 1)) == (4, 2**62)
    assert _head_slice(sliced(0, 4, 2, 1)) is None
    assert _head_slice(sliced(0, 4, 3, 2)) is None
    assert _head_slice(sliced(0, 4, 3, 1, dynamic=True)) is None
