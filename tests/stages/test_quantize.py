import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline import metrics
from pipeline.artifacts import Artifact
from pipeline.backends.onnxruntime_backend import OrtRunner
from pipeline.build import BuildOptions, build
from pipeline.errors import PreconditionError
from pipeline.outliers import MARKER
from pipeline.stages.base import BuildContext
from pipeline.stages.export import MODEL_FILE
from pipeline.stages.quantize import QuantizeConfig, QuantizeStage, weight_matmuls

TEXTS = ["Return a new list containing all items.", "Short.", "The parser reads the header."]


def _quantize(source: Path, out: Path, reference: Artifact, **config):  # type: ignore[no-untyped-def]
    out.mkdir()
    inputs = {"model": Artifact.of("model", source), "reference": reference}
    for name in ("calibration", "channels"):
        if name in config:
            inputs[name] = config.pop(name)
    result = QuantizeStage(QuantizeConfig(**config)).run(BuildContext(), inputs, out)
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


def test_every_weight_matmul_is_quantized_and_stays_close(
    fused_bert, bert_parts, checkpoint, tmp_path
) -> None:
    folder, result = _quantize(fused_bert, tmp_path / "q", bert_parts["reference"])
    float_model = onnx.load(str(fused_bert / MODEL_FILE))
    # Per layer: Q, K, V, the attention output and the two FFN projections.
    assert result.stats["weight_matmuls"] == len(weight_matmuls(float_model)) == 12
    assert result.stats["quantized_matmuls"] == 12
    sensitivity = result.stats["sensitivity"]
    assert len(sensitivity) == 10 and all(s["sqnr_db"] > 10 for s in sensitivity)
    assert [s["sqnr_db"] for s in sensitivity] == sorted(s["sqnr_db"] for s in sensitivity)
    assert sensitivity[0]["module"].startswith("encoder.layer.")
    assert (folder / "tokenizer.json").is_file()
    assert (folder / MODEL_FILE).stat().st_size < (fused_bert / MODEL_FILE).stat().st_size
    reference, mask = _hidden(fused_bert / MODEL_FILE, checkpoint)
    quantized, _ = _hidden(folder / MODEL_FILE, checkpoint)
    cosine = metrics.cosine(
        metrics.pool(reference, mask, "mean"), metrics.pool(quantized, mask, "mean")
    )
    assert cosine.min() > 0.99
    assert 0 < metrics.token_errors(reference, quantized, mask)[0] < 0.5


def test_excluded_nodes_stay_float(fused_bert, bert_parts, tmp_path) -> None:
    keep = weight_matmuls(onnx.load(str(fused_bert / MODEL_FILE)))[-1]
    folder, result = _quantize(fused_bert, tmp_path / "q", bert_parts["reference"], exclude=(keep,))
    assert result.stats["quantized_matmuls"] == 11
    assert [k["node"] for k in result.stats["kept_float"]] == [keep]
    nodes = {n.name: n.op_type for n in onnx.load(str(folder / MODEL_FILE)).graph.node}
    assert nodes[keep] == "MatMul"


def test_excluding_an_unknown_node_is_an_error(fused_bert, bert_parts, tmp_path) -> None:
    with pytest.raises(PreconditionError, match="nodes the graph does not have"):
        _quantize(fused_bert, tmp_path / "q", bert_parts["reference"], exclude=("no_such_node",))


def test_an_int8_variant_builds_verifies_and_reports(checkpoint, recipe_for, tmp_path) -> None:
    recipe = recipe_for(
        checkpoint("bert"),
        variants=[
            {"name": "fp32"},
            {"name": "int8", "precision": "int8"},
            {"name": "fp16", "precision": "fp16"},
            {
                "name": "int8-outliers",
                "precision": "int8",
                "quantize": {"outliers": {"samples": 16, "threshold": 2}},
            },
            {
                "name": "int8-smooth",
                "precision": "int8",
                "quantize": {
                    "smooth": {"samples": 16},
                    "outliers": {"samples": 16, "threshold": 1000},
                },
            },
        ],
    )
    outcome = build(recipe, BuildOptions(artifacts=tmp_path))
    steps = [s.step for s in outcome.manifest.stages]
    # Outlier channels: their ranges measured on calibration text, then split out in float.
    assert (
        steps.index("optimize[int8-outliers]")
        < steps.index("channels[int8-outliers]")
        < steps.index("quantize[int8-outliers]")
    )
    channels = outcome.manifest.stage("channels[int8-outliers]")
    assert channels.stats["samples"] == 16 and channels.stats["weights"] == 12
    split = outcome.manifest.stage("quantize[int8-outliers]").stats
    assert split["quantized_matmuls"] == 12 and split["outliers"]["matmuls"] > 0
    report = (outcome.run_dir / "report.md").read_text()
    o = split["outliers"]
    assert f"{o['channels']} channels of {o['inputs']} inputs to {o['matmuls']} MatMuls" in report
    # Smoothing reads the same ranges (one channels stage, from the cache the second time).
    smoothed = outcome.manifest.stage("quantize[int8-smooth]").stats
    assert smoothed["smooth"] == {"alpha": 0.75, "inputs": 8, "matmuls": 12}
    assert outcome.manifest.stage("channels[int8-smooth]").key == channels.key
    assert "Smoothed (SmoothQuant-style, alpha 0.75): 8 inputs of 12 MatMuls" in report
    # Nothing of random weights stands out 1000x: nothing split, and the report says so.
    assert smoothed["outliers"]["matmuls"] == 0
    assert "no input has channels over 1000.0x its median channel's after smoothing" in report
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
    fp16 = {
        c.metric: c
        for c in outcome.manifest.checks
        if c.variant == "fp16" and c.source == "tolerance"
    }
    assert fp16["max_abs_error"].passed and fp16["max_abs_error"].value > 0
    assert steps.index("optimize[fp16]") < steps.index("fp16[fp16]") < steps.index("verify[fp16]")
    assert outcome.passed


def test_a_graph_without_value_types_is_a_clear_error(fused_bert, bert_parts, tmp_path) -> None:
    untyped = tmp_path / "untyped"
    untyped.mkdir()
    model = onnx.load(str(fused_bert / MODEL_FILE))
    del model.graph.value_info[:]
    onnx.save(model, str(untyped / MODEL_FILE))
    with pytest.raises(PreconditionError, match="quantiz") as caught:
        _quantize(untyped, tmp_path / "q", bert_parts["reference"])
    assert "optimize: ort or standard" in str(caught.value)


def _with_sensitive_node(source: Path, folder: Path) -> str:
    """The model with one FFN down-projection made fragile under INT8, the same in float.

    Its input's channel 0 is multiplied by 1e4 and the matching weight row divided by 1e4:
    the float product is unchanged, but a per-tensor activation scale now spans the outlier
    and rounds every other channel to zero.
    """
    from onnx import helper, numpy_helper

    model = onnx.load(str(source / MODEL_FILE))
    weights = {i.name: i for i in model.graph.initializer}
    node = [n for n in model.graph.node if n.name in weight_matmuls(model)][-1]
    weight = numpy_helper.to_array(weights[node.input[1]]).copy()
    weight[0, :] /= 1e4
    weights[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
    scale = np.ones(weight.shape[0], dtype=np.float32)
    scale[0] = 1e4
    model.graph.initializer.append(numpy_helper.from_array(scale, "fragile_factor"))
    nodes = list(model.graph.node)
    nodes.insert(
        nodes.index(node),
        helper.make_node("Mul", [node.input[0], "fragile_factor"], ["outlier"], name="outlier"),
    )
    node.input[0] = "outlier"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.value_info.append(
        helper.make_tensor_value_info("outlier", onnx.TensorProto.FLOAT, None)
    )
    folder.mkdir()
    onnx.save(model, str(folder / MODEL_FILE))
    for extra in source.iterdir():
        if extra.name != MODEL_FILE:
            (folder / extra.name).write_bytes(extra.read_bytes())
    return node.name


def test_the_budget_keeps_a_sensitive_node_in_float(fused_bert, bert_parts, tmp_path) -> None:
    fragile = _with_sensitive_node(fused_bert, tmp_path / "fragile")
    _, plain = _quantize(tmp_path / "fragile", tmp_path / "plain", bert_parts["reference"])
    # Locally the fragile node's INT8 output is all rounding noise (about 0 dB).
    assert plain.stats["sensitivity"][0]["node"] == fragile
    assert plain.stats["sensitivity"][0]["sqnr_db"] < 3
    folder, result = _quantize(
        tmp_path / "fragile",
        tmp_path / "budget",
        bert_parts["reference"],
        budget={"min_mean_cosine": 0.99999},
        threads=1,
    )
    budget = result.stats["budget"]
    # Everything quantized misses the limit; the fragile node alone in float meets it.
    assert [(a["kept_float"], a["passed"]) for a in budget["attempts"]] == [(0, False), (1, True)]
    assert budget["met"] and budget["kept_float"] == 1
    assert result.stats["kept_float"][0]["node"] == fragile
    assert result.stats["sensitivity"][0]["node"] == fragile
    assert result.stats["quantized_matmuls"] == 12 - budget["kept_float"]
    nodes = {n.name: n.op_type for n in onnx.load(str(folder / MODEL_FILE)).graph.node}
    assert nodes[fragile] == "MatMul"


def test_static_qdq_takes_its_activation_scales_from_the_table(
    fused_bert, bert_parts, checkpoint, tmp_path
) -> None:
    from pipeline.calibration.table import CalibrationTable
    from pipeline.stages.calibrate import TABLE
    from tests.stages.test_calibrate import calibrate

    table_folder, _ = calibrate(bert_parts, tmp_path / "c", method="percentile")
    folder, result = _quantize(
        fused_bert,
        tmp_path / "q",
        bert_parts["reference"],
        method="static",
        calibration=Artifact.of("calibration", table_folder),
    )
    assert result.stats["quantized_matmuls"] == 12 and result.stats["calibration"] == "percentile"
    model = onnx.load(str(folder / MODEL_FILE))
    assert not any(n.op_type == "MatMulInteger" for n in model.graph.node)
    table = CalibrationTable.read(table_folder / TABLE)
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in table.ranges:
            low, high = table.ranges[node.input[0]]
            expected = (max(high, 0.0) - min(low, 0.0)) / 255  # asymmetric, unsigned
            assert float(constants[node.input[1]]) == pytest.approx(expected, rel=1e-5)
            checked += 1
    assert checked >= 6
    reference, mask = _hidden(fused_bert / MODEL_FILE, checkpoint)
    quantized, _ = _hidden(folder / MODEL_FILE, checkpoint)
    cosine = metrics.cosine(
        metrics.pool(reference, mask, "mean"), metrics.pool(quantized, mask, "mean")
    )
    assert cosine.min() > 0.98


def test_static_and_budget_variants_build_and_share_one_calibration(
    checkpoint, recipe_for, tmp_path
) -> None:
    static = {"method": "static", "calibration": {"samples": 16}}
    recipe = recipe_for(
        checkpoint("bert"),
        variants=[
            {"name": "static", "precision": "int8", "quantize": static},
            {"name": "static-x", "precision": "int8", "quantize": {**static, "per_channel": False}},
            {
                "name": "budget",
                "precision": "int8",
                "quantize": {"budget": {"min_mean_cosine": 0.9}},
            },
        ],
    )
    outcome = build(recipe, BuildOptions(artifacts=tmp_path))
    stages = {s.step: s for s in outcome.manifest.stages}
    assert stages["calibrate[static]"].key == stages["calibrate[static-x]"].key
    assert stages["calibrate[static]"].stats["samples"] == 16
    assert stages["quantize[budget]"].stats["budget"]["met"]
    budget_checks = [c for c in outcome.manifest.checks if c.source == "budget"]
    assert [(c.variant, c.metric, c.passed) for c in budget_checks] == [
        ("budget", "mean_cosine", True)
    ]
    assert outcome.passed
    markdown = (outcome.run_dir / "report.md").read_text()
    assert "## INT8" in markdown and "most sensitive" in markdown
    # The static variants report the calibration data they were made with.
    assert "minmax calibration on 16 samples" in markdown
    report = json.loads((outcome.run_dir / "report.json").read_text())
    static_q = next(c for c in report["contenders"] if c["name"] == "static")["quantization"]
    assert static_q["calibration_data"]["samples"] == 16


def test_remedies_are_searched_and_the_data_chooses(fused_bert, bert_parts, tmp_path) -> None:
    fragile = _with_sensitive_node(fused_bert, tmp_path / "fragile")
    _, result = _quantize(
        tmp_path / "fragile",
        tmp_path / "remedies",
        bert_parts["reference"],
        budget={"min_mean_cosine": 0.99999},
        remedies=("reduce_range", "per_tensor", "ffn_down_first"),
        threads=1,
        reduce_range=False,  # as configured: 8-bit weights, whatever this CPU's default
    )
    budget = result.stats["budget"]
    tried = {r["name"]: r for r in budget["remedies"]}
    assert list(tried) == ["as configured", "reduce_range", "per_tensor", "ffn_down_first"]
    for remedy in tried.values():
        # Every search verified its candidates end to end, and its result is one of them.
        passed = [a["kept_float"] for a in remedy["attempts"] if a["passed"]]
        assert remedy["met"] == bool(passed)
        if passed:
            assert remedy["kept_float"] == min(passed)
    fewest = min(r["kept_float"] for r in tried.values() if r["met"])
    assert tried[budget["remedy"]]["kept_float"] == fewest == budget["kept_float"]
    # The fragile FFN down-projection is first in float whichever order the search used.
    assert result.stats["kept_float"][0]["node"] == fragile
    assert result.stats["quantized_matmuls"] == 12 - budget["kept_float"]


def test_the_remedy_with_the_fewest_float_nodes_wins() -> None:
    from pipeline.budget import Attempt, BudgetResult
    from pipeline.stages.quantize import choose_remedy

    def trial(name: str, kept: int, met: bool, cosine: float) -> tuple:
        attempt = Attempt(kept, {"mean_cosine": cosine}, met)
        return (name, {}, [], BudgetResult(kept_float=kept, met=met, attempts=[attempt]))

    limits = {"min_mean_cosine": 0.999}
    trials = [
        trial("as configured", 5, True, 0.9991),
        trial("reduce_range", 3, True, 0.9990),
        trial("per_tensor", 1, False, 0.95),
    ]
    assert choose_remedy(limits, trials)[0] == "reduce_range"
    # Ties go to the earlier search (the variant's own settings come first).
    assert (
        choose_remedy(limits, [trials[1], trial("ffn_down_first", 3, True, 0.9999)])[0]
        == "reduce_range"
    )
    # None met: the closest miss.
    misses = [trial("as configured", 8, False, 0.990), trial("reduce_range", 8, False, 0.997)]
    assert choose_remedy(limits, misses)[0] == "reduce_range"


def _channels(model: Path, bert_parts, out: Path) -> Artifact:  # type: ignore[no-untyped-def]
    from pipeline.calibration import shipped_data
    from pipeline.stages.channels import ChannelsConfig, ChannelsStage

    out.mkdir()
    inputs = {
        "model": Artifact.of("model", model),
        "info": bert_parts["info"],
        "calibration": Artifact.of("calibration", shipped_data("calibration")),
    }
    ChannelsStage(ChannelsConfig(samples=16, max_length=64)).run(BuildContext(), inputs, out)
    return Artifact.of("channels", out / "channels")


def test_outlier_channels_are_multiplied_in_float(
    fused_bert, bert_parts, checkpoint, tmp_path
) -> None:
    fragile = _with_sensitive_node(fused_bert, tmp_path / "fragile")
    channels = _channels(tmp_path / "fragile", bert_parts, tmp_path / "c")
    _, plain = _quantize(tmp_path / "fragile", tmp_path / "plain", bert_parts["reference"])
    folder, result = _quantize(
        tmp_path / "fragile",
        tmp_path / "split",
        bert_parts["reference"],
        outliers=(3.0, 8),
        channels=channels,
    )
    outliers = result.stats["outliers"]
    # The planted 1e4 channel stands out most, named by its module.
    module = next(s["module"] for s in plain.stats["sensitivity"] if s["node"] == fragile)
    assert outliers["largest"][0]["module"] == module
    assert outliers["largest"][0]["ratio"] > 1000
    assert outliers["matmuls"] >= 1 and outliers["channels"] >= outliers["matmuls"]
    # Every weight MatMul is still INT8; the narrow outlier products stay float.
    assert result.stats["quantized_matmuls"] == result.stats["weight_matmuls"] == 12
    ops = [n.op_type for n in onnx.load(str(folder / MODEL_FILE)).graph.node]
    assert ops.count("MatMul") == outliers["matmuls"]
    assert not any(MARKER in s["node"] for s in result.stats["sensitivity"])
    # The fragile node, all rounding noise before, is now an ordinary INT8 MatMul: no longer
    # the most sensitive, and wherever it is listed, far from 0 dB.
    # (With 7-bit weights, on CPUs without VNNI, every MatMul loses ~6 dB and the node may
    # still rank first among ordinary ones.)
    sensitivity = result.stats["sensitivity"]
    assert QuantizeConfig().reduce_range or sensitivity[0]["node"] != fragile
    assert all(s["sqnr_db"] > 10 for s in sensitivity if s["node"] == fragile)
    reference, mask = _hidden(tmp_path / "fragile" / MODEL_FILE, checkpoint)

    def worst_cosine(path: Path) -> float:
        hidden, _ = _hidden(path, checkpoint)
        return float(
            metrics.cosine(
                metrics.pool(reference, mask, "mean"), metrics.pool(hidden, mask, "mean")
            ).min()
        )

    plain_loss = 1 - worst_cosine(tmp_path / "plain" / "model" / MODEL_FILE)
    split_loss = 1 - worst_cosine(folder / MODEL_FILE)
    # Measured: 4.7e-5 of worst cosine lost plainly, 2e-8 with the channel split out.
    assert split_loss < plain_loss / 100
    # Nothing of the split graph is left beside the model.
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["model"]


def test_the_budget_search_keeps_the_outlier_products_float(
    fused_bert, bert_parts, tmp_path, monkeypatch
) -> None:
    import pipeline.stages.quantize as stage

    _with_sensitive_node(fused_bert, tmp_path / "fragile")
    channels = _channels(tmp_path / "fragile", bert_parts, tmp_path / "c")
    excludes: list[list[str]] = []
    real = stage.quantize_file

    def recorded(source, target, config, exclude, table=None):  # type: ignore[no-untyped-def]
        excludes.append(list(exclude))
        return real(source, target, config, exclude, table)

    monkeypatch.setattr(stage, "quantize_file", recorded)
    folder, result = _quantize(
        tmp_path / "fragile",
        tmp_path / "budget",
        bert_parts["reference"],
        outliers=(3.0, 8),
        channels=channels,
        budget={"min_mean_cosine": 0.999},
        threads=1,
    )
    budget = result.stats["budget"]
    # The fragile node no longer needs float: everything in INT8 meets the limit.
    assert budget["met"] and budget["kept_float"] == 0 and budget["of"] == 12
    assert result.stats["quantized_matmuls"] == 12
    ops = [n.op_type for n in onnx.load(str(folder / MODEL_FILE)).graph.node]
    assert ops.count("MatMul") == result.stats["outliers"]["matmuls"]
    # Every candidate of the search (one per node, then the attempts) and the final model
    # left the outlier products float.
    names = [n.name for n in onnx.load(str(folder / MODEL_FILE)).graph.node]
    products = {name for name in names if name.endswith(MARKER)}
    assert len(products) == result.stats["outliers"]["matmuls"]
    assert len(excludes) > 12 and all(products <= set(e) for e in excludes)


def test_smoothing_moves_a_planted_outlier_into_its_weight_row(
    fused_bert, bert_parts, checkpoint, tmp_path
) -> None:
    """The fragile node's 1e4 channel is a 1e4 weight row moved into the input: smoothing
    moves it back, so nothing is left for the outlier split."""
    fragile = _with_sensitive_node(fused_bert, tmp_path / "fragile")
    channels = _channels(tmp_path / "fragile", bert_parts, tmp_path / "c")
    _, plain = _quantize(tmp_path / "fragile", tmp_path / "plain", bert_parts["reference"])
    folder, result = _quantize(
        tmp_path / "fragile",
        tmp_path / "smooth",
        bert_parts["reference"],
        smooth=0.75,
        outliers=(3.0, 8),
        channels=channels,
    )
    smooth = result.stats["smooth"]
    # Per layer: the Q/K/V input, the attention output's, the FFN's two; all 12 MatMuls.
    assert smooth == {"alpha": 0.75, "inputs": 8, "matmuls": 12}
    assert result.stats["outliers"]["matmuls"] == 0
    assert result.stats["quantized_matmuls"] == result.stats["weight_matmuls"] == 12
    ops = [n.op_type for n in onnx.load(str(folder / MODEL_FILE)).graph.node]
    assert ops.count("MatMul") == 0
    assert all(s["sqnr_db"] > 10 for s in result.stats["sensitivity"] if s["node"] == fragile)
    reference, mask = _hidden(tmp_path / "fragile" / MODEL_FILE, checkpoint)

    def worst_loss(path: Path) -> float:
        hidden, _ = _hidden(path, checkpoint)
        pooled = metrics.pool(reference, mask, "mean"), metrics.pool(hidden, mask, "mean")
        return 1 - float(metrics.cosine(*pooled).min())

    assert (
        worst_loss(folder / MODEL_FILE)
        < worst_loss(tmp_path / "plain" / "model" / MODEL_FILE) / 100
    )
    assert plain.stats["sensitivity"][0]["node"] == fragile


def test_the_smooth_remedy_is_searched_on_the_smoothed_graph(
    fused_bert, bert_parts, tmp_path
) -> None:
    """Plain INT8 needs the fragile node in float; smoothed, nothing: the data picks smooth,
    and the model is quantized from the smoothed graph."""
    fragile = _with_sensitive_node(fused_bert, tmp_path / "fragile")
    channels = _channels(tmp_path / "fragile", bert_parts, tmp_path / "c")
    folder, result = _quantize(
        tmp_path / "fragile",
        tmp_path / "remedy",
        bert_parts["reference"],
        budget={"min_worst_cosine": 0.99999},
        remedies=("smooth",),
        channels=channels,
        threads=1,
    )
    budget = result.stats["budget"]
    tried = {r["name"]: r for r in budget["remedies"]}
    assert list(tried) == ["as configured", "smooth"]
    assert tried["as configured"]["met"] and tried["as configured"]["kept_float"] >= 1
    assert tried["smooth"]["met"] and tried["smooth"]["kept_float"] == 0
    assert budget["remedy"] == "smooth" and budget["kept_float"] == 0
    assert result.stats["smooth"] == {"alpha": 0.75, "inputs": 8, "matmuls": 12}
    assert result.stats["quantized_matmuls"] == 12
    names = [n.name for n in onnx.load(str(folder / MODEL_FILE)).graph.node]
    assert sum(name.endswith(".smooth") for name in names) == 8
    assert fragile not in [k["node"] for k in result.stats["kept_float"]]
    # The sensitivity listed is the smoothed graph's, measured again: the fragile node, worst
    # by far in plain INT8 (0 dB), is an ordinary one there.
    sensitivity = result.stats["sensitivity"]
    errors = {e["node"]: e for e in sensitivity}
    assert errors[fragile]["output_error"] < 2 * sensitivity[1]["output_error"]
    assert errors[fragile]["sqnr_db"] > 10


def test_static_qdq_quantizes_weight_matmuls_only(bert_parts, tmp_path) -> None:
    """On a standard-op graph the attention products (QK^T, probabilities x V) are MatMuls of
    two activations: they stay float, as the MultiHeadAttention of the fused graph does."""
    from pipeline.stages.optimize import OptimizeConfig, OptimizeStage
    from tests.stages.test_calibrate import calibrate

    (tmp_path / "std").mkdir()
    OptimizeStage(OptimizeConfig(profile="standard")).run(
        BuildContext(),
        {"model": bert_parts["export"], "info": bert_parts["info"]},
        tmp_path / "std",
    )
    standard = tmp_path / "std" / "model"
    parts = {**bert_parts, "model": Artifact.of("model", standard)}
    table, _ = calibrate(parts, tmp_path / "c", symmetric=True)
    folder, result = _quantize(
        standard,
        tmp_path / "q",
        bert_parts["reference"],
        method="static",
        calibration=Artifact.of("calibration", table),
    )
    float_graph = onnx.load(str(standard / MODEL_FILE))
    weights = set(weight_matmuls(float_graph))
    matmuls = [n.name for n in float_graph.graph.node if n.op_type == "MatMul"]
    assert len(weights) == 12 and len(matmuls) == 12 + 2 * 2  # 2 attention products per layer
    graph = onnx.load(str(folder / MODEL_FILE)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    quantized = {
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and any(i in dequantized for i in n.input)
    }
    assert quantized == weights and result.stats["quantized_matmuls"] == 12

    # Every weight MatMul kept float: the float graph itself (an empty node list would have
    # told ONNX Runtime's quantizer to quantize every node).
    folder, result = _quantize(
        standard,
        tmp_path / "none",
        bert_parts["reference"],
        method="static",
        calibration=Artifact.of("calibration", table),
        exclude=tuple(sorted(weights)),
    )
    assert result.stats["quantized_matmuls"] == 0
    ops = {n.op_type for n in onnx.load(str(folder / MODEL_FILE)).graph.node}
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
