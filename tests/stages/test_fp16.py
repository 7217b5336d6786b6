from pathlib import Path

import onnx
import pytest

from pipeline.artifacts import Artifact
from pipeline.backends.onnxruntime_backend import OrtRunner
from pipeline.stages.base import BuildContext
from pipeline.stages.export import MODEL_FILE
from pipeline.stages.fp16 import Fp16Config, Fp16Stage, cascaded_casts
from pipeline.stages.optimize import OptimizeConfig, OptimizeStage
from pipeline.stages.reference import ReferenceData
from pipeline.stages.verify import compare_to_reference


def _optimized(parts, tmp: Path, profile: str, fusions: tuple[str, ...]) -> Path:  # type: ignore[no-untyped-def]
    (tmp / "optimize").mkdir()
    OptimizeStage(OptimizeConfig(profile=profile, fusions=fusions)).run(
        BuildContext(), {"model": parts["export"], "info": parts["info"]}, tmp / "optimize"
    )
    return tmp / "optimize" / "model"


@pytest.mark.parametrize(("profile", "fusions"), [("ort", ("attention", "ffn")), ("standard", ())])
def test_fp16_keeps_io_and_fragile_ops_in_float32(bert_parts, tmp_path, profile, fusions) -> None:
    source = _optimized(bert_parts, tmp_path, profile, fusions)
    (tmp_path / "half").mkdir()
    result = Fp16Stage(Fp16Config()).run(
        BuildContext(), {"model": Artifact.of("model", source)}, tmp_path / "half"
    )
    model = onnx.load(str(tmp_path / "half" / "model" / MODEL_FILE))
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type == float32 for v in model.graph.output)
    weights = [
        i for i in model.graph.initializer if len(i.dims) == 2 and i.data_type in (float32, float16)
    ]
    assert weights and [w.name for w in weights if w.data_type != float16] == []
    assert cascaded_casts(model) == []
    assert result.stats["kept_float"].get("LayerNormalization", 0) > 0
    # LayerNormalization runs on float32: its inputs are all float32-typed.
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            assert {types.get(name) for name in node.input if name} == {float32}
    ref = ReferenceData.of(bert_parts["reference"])
    runner = OrtRunner(tmp_path / "half" / "model" / MODEL_FILE, 1, "basic")
    figures = compare_to_reference(ref, lambda feed: runner.run(feed)[ref.index["output"]])
    assert 0 < figures["max_abs_error"] < 2e-2
    assert figures["mean_cosine"] > 0.99999 and figures["nonfinite_outputs"] == 0
    # Weights halve; on a tiny model the graph itself is a large share of the file.
    assert (tmp_path / "half" / "model" / MODEL_FILE).stat().st_size < 0.75 * (
        source / MODEL_FILE
    ).stat().st_size


def test_cascaded_casts_are_found() -> None:
    from onnx import helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["h"], to=onnx.TensorProto.FLOAT16, name="a"),
            helper.make_node("Cast", ["h"], ["y"], to=onnx.TensorProto.FLOAT, name="b"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    assert cascaded_casts(helper.make_model(graph)) == ["b"]
