import pytest

from pipeline.errors import PreconditionError
from pipeline.passes import run_passes
from pipeline.passes.base import count_ops
from pipeline.passes.fold_constants import FoldConstants
from pipeline.passes.fuse_layernorm import FuseLayerNorm
from pipeline.passes.infer_shapes import InferShapes
from tests.passes.conftest import max_difference, unrelated_graph, without_shapes
from tests.tiny import ALL_FAMILIES


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_residual_add_fuses_into_every_layers_norms(exported, family, tmp_path) -> None:
    model = exported(family)
    before = model.load()
    norms = count_ops(before, "LayerNormalization")
    after, records = run_passes(model.load(), [InferShapes(), FoldConstants(), FuseLayerNorm()])
    skip = count_ops(after, "SkipLayerNormalization")
    assert skip >= model.expected("skip-layernorm")
    # Each skip fusion replaces one LayerNormalization; none is lost or duplicated.
    assert skip + count_ops(after, "LayerNormalization") == norms
    assert records[-1].stats["SkipLayerNormalization"] == skip
    assert max_difference(before, after, model, tmp_path) < 1e-5


def test_layernorm_leaves_an_unrelated_graph_alone() -> None:
    result = FuseLayerNorm()(unrelated_graph())
    assert not result.changed
    assert [n.op_type for n in result.model.graph] == ["MatMul", "Relu", "Add"]


def test_layernorm_needs_shapes(exported) -> None:
    with pytest.raises(PreconditionError, match="run infer-shapes first"):
        FuseLayerNorm()(without_shapes(exported("bert").load()))
