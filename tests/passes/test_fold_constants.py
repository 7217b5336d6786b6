import onnx_ir as ir

from pipeline.passes import run_passes
from pipeline.passes.base import count_ops
from pipeline.passes.fold_constants import FoldConstants
from pipeline.passes.fuse_attention import FuseAttention
from pipeline.passes.infer_shapes import InferShapes
from tests.passes.conftest import max_difference, unrelated_graph


def _packed_weight(model: ir.Model) -> ir.Value:
    attention = next(n for n in model.graph if n.op_type == "Attention")
    weight = attention.inputs[1]
    assert weight is not None
    return weight


def test_folding_removes_shape_arithmetic(exported, tmp_path) -> None:
    model = exported("bert")
    before = model.load()
    after, records = run_passes(model.load(), [InferShapes(), FoldConstants()])
    assert records[-1].stats["nodes_removed"] > 0
    assert len(after.graph) < len(before.graph)
    assert max_difference(before, after, model, tmp_path) < 1e-6


def test_large_refold_makes_the_packed_qkv_weight_one_initializer(exported, tmp_path) -> None:
    model = exported("bert")
    fused, _ = run_passes(model.load(), [InferShapes(), FoldConstants(), FuseAttention()])
    # After fusion the packed weight is computed on every call: Concat of three matrices.
    assert _packed_weight(fused).producer() is not None
    assert _packed_weight(fused).producer().op_type == "Concat"  # type: ignore[union-attr]
    folded, records = run_passes(fused, [FoldConstants(large=True)])
    weight = _packed_weight(folded)
    assert weight.producer() is None and weight.const_value is not None
    hidden = int(model.info.architecture["hidden"])
    assert weight.const_value.shape.numpy() == (hidden, 3 * hidden)
    assert records[-1].stats["nodes_removed"] > 0
    assert count_ops(folded, "Attention") == model.layers
    assert max_difference(model.load(), folded, model, tmp_path) < 1e-5


def test_folding_leaves_an_unrelated_graph_alone() -> None:
    result = FoldConstants()(unrelated_graph())
    assert not result.changed
    assert [n.op_type for n in result.model.graph] == ["MatMul", "Relu", "Add"]
