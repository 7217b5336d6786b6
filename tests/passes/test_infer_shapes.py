from pipeline.passes.base import has_value_shapes
from pipeline.passes.infer_shapes import InferShapes
from tests.passes.conftest import unrelated_graph, without_shapes


def test_shapes_are_inferred_for_every_value() -> None:
    model = without_shapes(unrelated_graph())
    assert not has_value_shapes(model)
    result = InferShapes()(model)
    assert has_value_shapes(result.model)
    assert result.stats["values_with_shape"] == 3
    out = next(iter(result.model.graph)).outputs[0]
    assert out.shape is not None and str(out.shape[1]) == "4"


def test_a_fully_shaped_graph_gains_nothing() -> None:
    result = InferShapes()(unrelated_graph())
    assert result.stats["values_with_shape"] == 0
