"""NNCF's static INT8 (pipeline.nncf_int8) on a tiny BERT: the fake-quantized graph, nodes kept
in float in it, the folded INT8 weights, and the quantize stage's NNCF path with a budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.artifacts import Artifact
from pipeline.backends.onnxruntime_backend import OrtRunner
from pipeline.calibration import shipped_data
from pipeline.stages.base import BuildContext
from pipeline.stages.export import MODEL_FILE
from pipeline.stages.quantize import QuantizeConfig, QuantizeStage, weight_matmuls

nncf_int8 = pytest.importorskip("pipeline.nncf_int8")
pytest.importorskip("nncf", reason="NNCF is tforge[openvino]'s quantizer")

DRAW = {"samples": 32, "seed": 0, "batch_size": 8, "max_length": 32, "text_field": "text"}


def _feeds(count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(count):
        ids = rng.integers(5, 600, (4, 16)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, 12:] = 0
        feeds.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids})
    return feeds


def _run(model: onnx.ModelProto, folder: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    folder.mkdir()
    onnx.save(model, str(folder / MODEL_FILE))
    return OrtRunner(folder / MODEL_FILE, 1, "basic").run(feed)["last_hidden_state"]


@pytest.fixture(scope="module")
def fake(fused_bert) -> onnx.ModelProto:
    return nncf_int8.quantize(onnx.load(str(fused_bert / MODEL_FILE)), _feeds())


def test_nncf_quantizes_every_weight_matmul_and_is_deterministic(fused_bert, fake) -> None:
    float_model = onnx.load(str(fused_bert / MODEL_FILE))
    names = weight_matmuls(float_model)
    producers = {o: n for n in fake.graph.node for o in n.output}
    for node in (n for n in fake.graph.node if n.name in names):
        # Both operands through a QuantizeLinear/DequantizeLinear pair; the weight stays float.
        for operand in node.input:
            assert producers[operand].op_type == "DequantizeLinear"
    # The same model and data give the same bytes.
    again = nncf_int8.quantize(float_model, _feeds())
    assert again.SerializeToString() == fake.SerializeToString()


def test_folded_weights_compute_what_the_fake_quantized_graph_does(fake, tmp_path) -> None:
    folded = nncf_int8.fold_weights(fake)
    assert not any(
        n.op_type == "QuantizeLinear" and n.input[0] in {i.name for i in fake.graph.initializer}
        for n in folded.graph.node
    )
    int8 = [i for i in folded.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 12  # every weight MatMul (and the embedding tables)
    # A tiny model: scales, biases and shapes weigh as much as its weights.
    assert folded.ByteSize() < 0.6 * fake.ByteSize()
    feed = _feeds(1)[0]
    expected = _run(fake, tmp_path / "fake", feed)
    assert np.array_equal(_run(folded, tmp_path / "folded", feed), expected)


def test_kept_float_nodes_multiply_their_float_operands_exactly(fused_bert, tmp_path) -> None:
    """With the embedding tables left alone (NNCF quantizes them weight-only), keeping every
    MatMul float gives back the float model: smoothing cancels in float."""
    float_model = onnx.load(str(fused_bert / MODEL_FILE))
    gathers = [n.name for n in float_model.graph.node if n.op_type == "Gather"]
    fake = nncf_int8.quantize(float_model, _feeds(), ignored=gathers)
    names = weight_matmuls(float_model)
    feed = _feeds(1)[0]
    reference = _run(float_model, tmp_path / "float", feed)
    quantized = _run(fake, tmp_path / "fake", feed)
    assert np.abs(quantized - reference).max() > 1e-4
    restored = nncf_int8.keep_float(fake, names)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in restored.graph.node)
    assert np.abs(_run(restored, tmp_path / "restored", feed) - reference).max() < 1e-5
    # One node: its operands are float tensors, the others still read Q/DQ pairs.
    one = nncf_int8.keep_float(fake, names[:1])
    producers = {o: n.op_type for n in one.graph.node for o in n.output}
    node = next(n for n in one.graph.node if n.name == names[0])
    assert all(producers.get(i) != "DequantizeLinear" for i in node.input)
    with pytest.raises(ValueError, match="no node named"):
        nncf_int8.keep_float(fake, ["no-such-node"])


def _nncf_stage(fused_bert, bert_parts, out: Path, **config):  # type: ignore[no-untyped-def]
    out.mkdir()
    inputs = {
        "model": Artifact.of("model", fused_bert),
        "reference": bert_parts["reference"],
        "calibration": Artifact.of("calibration", shipped_data("calibration")),
        "info": bert_parts["info"],
    }
    stage = QuantizeStage(
        QuantizeConfig(method="static", quantizer="nncf", draw=DRAW, threads=1, **config)
    )
    return stage.run(BuildContext(), inputs, out)


def test_the_nncf_stage_quantizes_and_its_budget_keeps_the_worst_nodes_float(
    fused_bert, bert_parts, tmp_path
) -> None:
    plain = _nncf_stage(fused_bert, bert_parts, tmp_path / "plain")
    assert plain.stats["quantizer"] == "nncf" and plain.stats["quantized_matmuls"] == 12
    # NNCF stores the three embedding tables in INT8 too (weight-only).
    assert plain.stats["quantized_tables"] == 3
    assert plain.stats["calibration_data"]["samples"] == 32
    budget = _nncf_stage(
        fused_bert, bert_parts, tmp_path / "budget", budget={"min_mean_cosine": 0.999999}
    )
    search = budget.stats["budget"]
    assert not search["attempts"][0]["passed"]
    assert search["met"] and search["kept_float"] >= 1
    kept = [k["node"] for k in budget.stats["kept_float"]]
    # The nodes kept float are the ones whose INT8 costs the most output accuracy.
    ranked = [s["node"] for s in budget.stats["sensitivity"]]
    assert kept == ranked[: len(kept)]
    # On this random model the embedding tables (weight-only INT8) cost the most.
    matmuls = set(weight_matmuls(onnx.load(str(fused_bert / MODEL_FILE))))
    assert budget.stats["quantized_matmuls"] == 12 - len(matmuls & set(kept))
    assert budget.stats["quantized_tables"] == 3 - len(set(kept) - matmuls)
    model = onnx.load(str(tmp_path / "budget" / "model" / MODEL_FILE))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in (n for n in model.graph.node if n.name in kept):
        assert all(producers.get(i) != "DequantizeLinear" for i in node.input)
