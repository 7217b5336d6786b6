from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from pipeline.passes import profile_passes, run_passes
from pipeline.passes.base import count_ops
from pipeline.passes.residual_sum import ResidualSum
from tests.passes.conftest import max_difference, unrelated_graph


def _session_ops(model: ir.Model, tmp_path: Path, name: str) -> Counter[str]:
    """The ops ONNX Runtime's CPU session runs after its own optimisation at level ``all``."""
    source, optimized = tmp_path / f"{name}.onnx", tmp_path / f"{name}.ort.onnx"
    ir.save(model, source)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


def test_the_session_keeps_add_and_layernorm_apart(exported, tmp_path) -> None:
    model = exported("bert")
    plain, _ = run_passes(model.load(), profile_passes("ort", ["mha", "ffn"]))
    summed, records = run_passes(model.load(), profile_passes("ort", ["mha", "ffn"], True))
    # Two residual Adds per layer feed a LayerNormalization, and the embeddings' sum one more.
    record = next(r for r in records if r.name == "residual-sum")
    assert record.stats["adds"] == count_ops(summed, "Sum") == 2 * model.layers + 1
    assert count_ops(plain, "Sum") == 0
    # Without the pass the session fuses SkipLayerNormalization on its own; with it, not.
    assert _session_ops(plain, tmp_path, "plain")["SkipLayerNormalization"] == 2 * model.layers
    ops = _session_ops(summed, tmp_path, "summed")
    assert ops["SkipLayerNormalization"] == 0
    assert ops["LayerNormalization"] == 2 * model.layers + 1
    assert max_difference(plain, summed, model, tmp_path) < 1e-5


def test_an_add_read_by_anything_but_layernorm_stays() -> None:
    result = ResidualSum()(unrelated_graph())
    assert not result.changed and result.stats == {"adds": 0}
