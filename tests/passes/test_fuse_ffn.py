import pytest

from pipeline.errors import PreconditionError
from pipeline.passes import run_passes
from pipeline.passes.base import count_ops
from pipeline.passes.fold_constants import FoldConstants
from pipeline.passes.fuse_ffn import FuseFFN
from pipeline.passes.infer_shapes import InferShapes
from tests.passes.conftest import max_difference, unrelated_graph, without_shapes
from tests.tiny import ALL_FAMILIES


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_bias_gelu_fuses_once_per_layer_where_the_family_allows(exported, family, tmp_path) -> None:
    model = exported(family)
    before = model.load()
    after, records = run_passes(model.load(), [InferShapes(), FoldConstants(), FuseFFN()])
    assert count_ops(after, "BiasGelu") == model.expected("ffn")
    assert records[-1].stats["bias_gelu"] == model.expected("ffn")
    assert max_difference(before, after, model, tmp_path) < 1e-5


def test_ffn_leaves_an_unrelated_graph_alone() -> None:
    result = FuseFFN()(unrelated_graph())
    assert not result.changed
    assert [n.op_type for n in result.model.graph] == ["MatMul", "Relu", "Add"]


def test_ffn_needs_shapes(exported) -> None:
    with pytest.raises(PreconditionError, match="fuse-ffn.*run infer-shapes first"):
        FuseFFN()(without_shapes(exported("bert").load()))
