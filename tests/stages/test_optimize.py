import logging
from pathlib import Path

import onnx
import pytest

from pipeline.architectures import Family
from pipeline.build import BuildOptions, build
from pipeline.stages.base import BuildContext
from pipeline.stages.export import MODEL_FILE
from pipeline.stages.optimize import OptimizeConfig, OptimizeStage
from tests.stages.helpers import run_export, run_load


def _optimize(checkpoint, tmp_path: Path, family: str, **config):  # type: ignore[no-untyped-def]
    ctx = BuildContext()
    folder = checkpoint(family)
    info, _ = run_load(ctx, folder, tmp_path / "load")
    model, _ = run_export(ctx, folder, info, tmp_path / "export")
    out = tmp_path / "optimize"
    out.mkdir()
    result = OptimizeStage(OptimizeConfig(**config)).run(ctx, {"model": model, "info": info}, out)
    return out / "model", result


def test_ort_profile_writes_a_loadable_fused_model_folder(checkpoint, tmp_path: Path) -> None:
    folder, result = _optimize(
        checkpoint, tmp_path, "bert", profile="ort", fusions=("attention", "skip-layernorm", "ffn")
    )
    onnx.checker.check_model(str(folder / MODEL_FILE))
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert result.stats["fusions"] == {
        "Attention": 2,
        "SkipLayerNormalization": 4,
        "LayerNormalization": 1,
        "BiasGelu": 2,
    }
    assert [p["pass"] for p in result.stats["passes"]][:2] == ["infer-shapes", "fold-constants"]
    assert all(dims == ["batch", "sequence"] for dims in result.stats["inputs"].values())


def test_standard_profile_keeps_to_standard_ops(checkpoint, tmp_path: Path) -> None:
    folder, result = _optimize(checkpoint, tmp_path, "roberta", profile="standard")
    model = onnx.load(str(folder / MODEL_FILE))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert result.stats["fusions"] == {"LayerNormalization": 5, "Gelu": 2}


def test_with_verbose_logging_a_missed_fusion_is_explained(
    checkpoint, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="pipeline.stages.optimize")
    _, result = _optimize(checkpoint, tmp_path, "mpnet", profile="ort", fusions=("attention",))
    assert "Attention" not in result.stats["fusions"]
    explained = [r.getMessage() for r in caplog.records if "the rewriter says" in r.getMessage()]
    assert explained and "0 Attention for 2 layers" in explained[0]
    assert "SDPA" in explained[0]  # the rewriter's own account of the first pattern it tried


def test_build_checks_fusions_against_the_architecture(checkpoint, recipe_for, tmp_path) -> None:
    outcome = build(
        recipe_for(checkpoint("distilbert"), latency={"enabled": False}),
        BuildOptions(artifacts=tmp_path),
    )
    fusion = [c for c in outcome.manifest.checks if c.source == "fusion"]
    assert {(c.metric, c.value, c.limit) for c in fusion} == {
        ("Attention", 2, 2),
        ("BiasGelu", 2, 2),
    }
    assert outcome.passed


def test_a_fusion_shortfall_fails_the_build_naming_it(
    checkpoint, recipe_for, tmp_path, monkeypatch
) -> None:
    import pipeline.report.checks

    # The spec says two attentions per layer; the graph can only have one.
    expects_more = Family("bert", ("bert",), fusions={"attention": 2, "ffn": 1})
    monkeypatch.setattr(pipeline.report.checks, "family_of", lambda _: expects_more)
    outcome = build(
        recipe_for(checkpoint("bert"), latency={"enabled": False}),
        BuildOptions(artifacts=tmp_path),
    )
    failed = [c for c in outcome.manifest.checks if not c.passed]
    assert [(c.source, c.metric, c.value, c.limit) for c in failed] == [
        ("fusion", "Attention", 2, 4)
    ]
    assert "would pass with >= 2" in str(failed[0])
    assert not outcome.passed


@pytest.mark.parametrize("optimize", ["none", "standard"])
def test_unfused_variants_have_no_fusion_checks(
    checkpoint, recipe_for, tmp_path, optimize: str
) -> None:
    outcome = build(
        recipe_for(
            checkpoint("bert"),
            latency={"enabled": False},
            variants=[{"name": "plain", "optimize": optimize}],
        ),
        BuildOptions(artifacts=tmp_path),
    )
    assert not [c for c in outcome.manifest.checks if c.source == "fusion"]
    steps = {s.step for s in outcome.manifest.stages}
    assert ("optimize[plain]" in steps) == (optimize != "none")
    assert outcome.passed


def test_the_fused_graph_quantizes_to_dynamic_int8(checkpoint, tmp_path: Path) -> None:
    """The fused graph stays a valid input to ONNX Runtime's INT8 quantizer, and close."""
    import numpy as np
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    from pipeline import metrics
    from pipeline.backends.onnxruntime_backend import OrtRunner

    folder, _ = _optimize(checkpoint, tmp_path, "bert", profile="ort", fusions=("attention", "ffn"))
    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(folder / MODEL_FILE, int8, weight_type=QuantType.QInt8, per_channel=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint("bert"))
    texts = ["Return a new list containing all items.", "Short.", "The parser reads the header."]
    encoded = tokenizer(texts, padding=True, return_tensors="np")
    feed = {
        k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    fused = OrtRunner(folder / MODEL_FILE, 1, "basic", name="fused").run(feed)["last_hidden_state"]
    quantized = OrtRunner(int8, 1, "basic", name="int8").run(feed)["last_hidden_state"]
    mask = encoded["attention_mask"]
    cosine = metrics.cosine(
        metrics.pool(fused, mask, "mean"), metrics.pool(quantized, mask, "mean")
    )
    assert cosine.min() > 0.99
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
