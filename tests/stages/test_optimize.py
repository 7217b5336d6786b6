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
    checkpoint, tmp_path: Path, caplog, monkeypatch
) -> None:
    import pipeline.stages.optimize

    caplog.set_level(logging.DEBUG, logger="pipeline.stages.optimize")

    def explained() -> list[str]:
        return [r.getMessage() for r in caplog.records if "the rewriter says" in r.getMessage()]

    # MPNet's spec expects no fused attention: nothing to explain.
    _, result = _optimize(
        checkpoint, tmp_path / "a", "mpnet", profile="ort", fusions=("attention",)
    )
    assert "Attention" not in result.stats["fusions"] and not explained()
    # A spec that expects one per layer gets the rewriter's reasons why none matched.
    expects = Family("mpnet", ("mpnet",), fusions={"attention": 1})
    monkeypatch.setattr(pipeline.stages.optimize, "family_of", lambda _: expects)
    _optimize(checkpoint, tmp_path / "b", "mpnet", profile="ort", fusions=("attention",))
    assert explained() and "0 Attention for 2 layers" in explained()[0]
    assert "SDPA" in explained()[0]  # the rewriter's own account of the first pattern it tried


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


def test_a_model_with_external_weights_is_optimized_into_its_own_data_file(
    checkpoint, tmp_path: Path
) -> None:
    """Large models keep weights in model.onnx.data; the optimized folder must hold its own."""
    import numpy as np

    from pipeline.artifacts import Artifact
    from pipeline.backends.onnxruntime_backend import OrtRunner

    ctx = BuildContext()
    folder = checkpoint("bert")
    info, _ = run_load(ctx, folder, tmp_path / "load")
    exported, _ = run_export(ctx, folder, info, tmp_path / "export")
    external = tmp_path / "external"
    external.mkdir()
    onnx.save(
        onnx.load(str(exported.path / MODEL_FILE)),
        str(external / MODEL_FILE),
        save_as_external_data=True,
        location=MODEL_FILE + ".data",
        size_threshold=0,
    )
    out = tmp_path / "optimize"
    out.mkdir()
    stage = OptimizeStage(OptimizeConfig(profile="ort", fusions=("attention", "ffn")))
    stage.run(ctx, {"model": Artifact.of("model", external), "info": info}, out)
    optimized = out / "model" / MODEL_FILE
    assert (out / "model" / (MODEL_FILE + ".data")).is_file()
    # The source can go: nothing in the optimized model points back at it.
    (external / (MODEL_FILE + ".data")).unlink()
    ids = np.array([[2, 40, 41, 42, 3]], dtype=np.int64)
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }
    got = OrtRunner(optimized, 1, "basic", name="t").run(feed)["last_hidden_state"]
    want = OrtRunner(exported.path / MODEL_FILE, 1, "all", name="t").run(feed)["last_hidden_state"]
    assert np.abs(got - want).max() < 1e-5


def test_weights_shared_by_layers_stay_shared_after_folding(checkpoint, tmp_path: Path) -> None:
    """ALBERT's layers share one weight: folding the packed QKV must not copy it per layer."""
    folder, result = _optimize(
        checkpoint, tmp_path, "albert", profile="ort", fusions=("attention",)
    )
    model = onnx.load(str(folder / MODEL_FILE))
    big = [init.raw_data for init in model.graph.initializer if len(init.raw_data) > 4096]
    assert len(big) == len(set(big))  # no two large initializers hold the same bytes
    large_fold = [p for p in result.stats["passes"] if p["pass"] == "fold-constants"][-1]
    assert large_fold["stats"]["weights_merged"] >= 1
