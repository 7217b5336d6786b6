import pytest

from pipeline.errors import PreconditionError
from pipeline.passes import run_passes
from pipeline.passes.base import count_ops
from pipeline.passes.fold_constants import FoldConstants
from pipeline.passes.fuse_attention import FuseAttention
from pipeline.passes.infer_shapes import InferShapes
from tests.passes.conftest import max_difference, unrelated_graph, without_shapes
from tests.tiny import ALL_FAMILIES


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_attention_fuses_once_per_layer_where_the_family_allows(exported, family, tmp_path) -> None:
    model = exported(family)
    before = model.load()
    after, records = run_passes(model.load(), [InferShapes(), FoldConstants(), FuseAttention()])
    assert count_ops(after, "Attention") == model.expected("attention")
    assert records[-1].stats["Attention"] == model.expected("attention")
    if model.expected("attention"):
        assert count_ops(after, "Softmax") == 0  # nothing of the decomposed attention is left
        assert records[-1].nodes_after < records[-1].nodes_before
    assert max_difference(before, after, model, tmp_path) < 1e-5


def test_attention_leaves_an_unrelated_graph_alone() -> None:
    graph = unrelated_graph()
    result = FuseAttention()(graph)
    assert not result.changed
    assert [n.op_type for n in result.model.graph] == ["MatMul", "Relu", "Add"]


def test_attention_needs_shapes(exported) -> None:
    model = without_shapes(exported("bert").load())
    with pytest.raises(PreconditionError, match="run infer-shapes first"):
        FuseAttention()(model)
