from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline import metrics
from pipeline.backends.onnxruntime_backend import OrtRunner
from pipeline.build import BuildOptions, build
from pipeline.errors import PreconditionError
from pipeline.stages.base import BuildContext
from pipeline.stages.export import MODEL_FILE
from pipeline.stages.optimize import OptimizeConfig, OptimizeStage
from pipeline.stages.quantize import QuantizeConfig, QuantizeStage, weight_matmuls
from tests.stages.helpers import run_export, run_load

TEXTS = ["Return a new list containing all items.", "Short.", "The parser reads the header."]


@pytest.fixture(scope="module")
def fused_bert(checkpoint, tmp_path_factory) -> Path:
    """A tiny BERT, exported and fused the default way: the usual input of INT8."""
    tmp = tmp_path_factory.mktemp("fused")
    ctx = BuildContext()
    folder = checkpoint("bert")
    info, _ = run_load(ctx, folder, tmp / "load")
    model, _ = run_export(ctx, folder, info, tmp / "export")
    (tmp / "optimize").mkdir()
    OptimizeStage(OptimizeConfig(profile="ort", fusions=("attention", "ffn"))).run(
        ctx, {"model": model, "info": info}, tmp / "optimize"
    )
    return tmp / "optimize" / "model"


def _quantize(source: Path, out: Path, **config):  # type: ignore[no-untyped-def]
    from pipeline.artifacts import Artifact

    out.mkdir()
    result = QuantizeStage(QuantizeConfig(**config)).run(
        BuildContext(), {"model": Artifact.of("model", source)}, out
    )
    return out / "model", result


def _hidden(path: Path, checkpoint) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint("bert"))
    encoded = tokenizer(TEXTS, padding=True, return_tensors="np")
    feed = {
        k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    out = OrtRunner(path, 1, "basic", name="t").run(feed)["last_hidden_state"]
    return out, encoded["attention_mask"]


def test_every_weight_matmul_is_quantized_and_stays_close(fused_bert, checkpoint, tmp_path) -> None:
    folder, result = _quantize(fused_bert, tmp_path / "q")
    float_model = onnx.load(str(fused_bert / MODEL_FILE))
    assert result.stats["weight_matmuls"] == len(weight_matmuls(float_model)) == 6
    assert result.stats["quantized_matmuls"] == 6
    assert (folder / "tokenizer.json").is_file()
    assert (folder / MODEL_FILE).stat().st_size < (fused_bert / MODEL_FILE).stat().st_size
    reference, mask = _hidden(fused_bert / MODEL_FILE, checkpoint)
    quantized, _ = _hidden(folder / MODEL_FILE, checkpoint)
    cosine = metrics.cosine(
        metrics.pool(reference, mask, "mean"), metrics.pool(quantized, mask, "mean")
    )
    assert cosine.min() > 0.99
    assert 0 < metrics.token_errors(reference, quantized, mask)[0] < 0.5


def test_excluded_nodes_stay_float(fused_bert, tmp_path) -> None:
    keep = weight_matmuls(onnx.load(str(fused_bert / MODEL_FILE)))[-1]
    folder, result = _quantize(fused_bert, tmp_path / "q", exclude=(keep,))
    assert result.stats["quantized_matmuls"] == 5 and result.stats["kept_float"] == [keep]
    nodes = {n.name: n.op_type for n in onnx.load(str(folder / MODEL_FILE)).graph.node}
    assert nodes[keep] == "MatMul"


def test_excluding_an_unknown_node_is_an_error(fused_bert, tmp_path) -> None:
    with pytest.raises(PreconditionError, match="nodes the graph does not have"):
        _quantize(fused_bert, tmp_path / "q", exclude=("no_such_node",))


def test_an_int8_variant_builds_verifies_and_reports(checkpoint, recipe_for, tmp_path) -> None:
    recipe = recipe_for(
        checkpoint("bert"),
        variants=[{"name": "fp32"}, {"name": "int8", "precision": "int8"}],
    )
    outcome = build(recipe, BuildOptions(artifacts=tmp_path))
    steps = [s.step for s in outcome.manifest.stages]
    assert (
        steps.index("optimize[int8]") < steps.index("quantize[int8]") < steps.index("verify[int8]")
    )
    quantize = next(s for s in outcome.manifest.stages if s.step == "quantize[int8]")
    assert quantize.stats["quantized_matmuls"] == quantize.stats["weight_matmuls"] > 0
    int8 = {
        c.metric: c
        for c in outcome.manifest.checks
        if c.variant == "int8" and c.source == "tolerance"
    }
    assert int8["mean_cosine"].passed and int8["mean_cosine"].limit < 0.99999
    assert (outcome.run_dir / "models" / "int8" / MODEL_FILE).is_file()
    assert outcome.passed


def test_a_graph_without_value_types_is_a_clear_error(fused_bert, tmp_path) -> None:
    untyped = tmp_path / "untyped"
    untyped.mkdir()
    model = onnx.load(str(fused_bert / MODEL_FILE))
    del model.graph.value_info[:]
    onnx.save(model, str(untyped / MODEL_FILE))
    with pytest.raises(PreconditionError, match="quantiz") as caught:
        _quantize(untyped, tmp_path / "q")
    assert "optimize: ort or standard" in str(caught.value)
