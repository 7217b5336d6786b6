import onnx_ir as ir

from pipeline.passes.remove_unused import RemoveUnused
from tests.passes.conftest import unrelated_graph


def test_a_node_nobody_reads_is_removed() -> None:
    model = unrelated_graph()
    x = model.graph.inputs[0]
    model.graph.append(ir.node("Neg", inputs=[x], name="dead"))
    result = RemoveUnused()(model)
    assert result.changed and result.stats["nodes_removed"] == 1
    assert [n.op_type for n in result.model.graph] == ["MatMul", "Relu", "Add"]


def test_a_graph_with_nothing_dead_is_left_alone() -> None:
    result = RemoveUnused()(unrelated_graph())
    assert not result.changed
    assert result.stats == {"nodes_removed": 0, "initializers_removed": 0}
