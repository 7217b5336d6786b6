import pytest

from pipeline.errors import PreconditionError
from pipeline.passes import run_passes
from pipeline.passes.base import count_ops
from pipeline.passes.fold_constants import FoldConstants
from pipeline.passes.fuse_mha import FuseMultiHeadAttention
from pipeline.passes.infer_shapes import InferShapes
from tests.passes.conftest import max_difference, unrelated_graph, without_shapes


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "mpnet"])
def test_mha_fuses_the_core_and_keeps_the_projections(exported, family, tmp_path) -> None:
    model = exported(family)
    before = model.load()
    matmuls = count_ops(before, "MatMul")
    after, records = run_passes(
        model.load(), [InferShapes(), FoldConstants(), FuseMultiHeadAttention()]
    )
    expected = model.expected("mha")
    assert count_ops(after, "MultiHeadAttention") == expected
    assert records[-1].stats["MultiHeadAttention"] == expected
    assert count_ops(after, "Attention") == 0
    if expected:
        # Q.K^T and P.V are inside the op; the four projections per layer stay MatMuls.
        assert count_ops(after, "MatMul") == matmuls - 2 * model.layers
        assert count_ops(after, "Softmax") == 0
    assert max_difference(before, after, model, tmp_path) < 1e-5


def test_mha_leaves_an_unrelated_graph_alone() -> None:
    result = FuseMultiHeadAttention()(unrelated_graph())
    assert not result.changed


def test_mha_needs_shapes(exported) -> None:
    with pytest.raises(PreconditionError, match="run infer-shapes first"):
        FuseMultiHeadAttention()(without_shapes(exported("bert").load()))
