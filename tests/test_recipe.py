from pathlib import Path

import pytest

from pipeline.errors import RecipeError, TargetUnavailable
from pipeline.recipe import (
    DEFAULT_MODEL,
    Recipe,
    default_recipe,
    dump_recipe,
    load_recipe,
    parse_recipe,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_packaged_model_and_two_shapes() -> None:
    recipe = parse_recipe({})
    assert recipe.model.source == DEFAULT_MODEL
    assert recipe.model.task == "feature-extraction"
    assert recipe.shapes.pairs() == [(1, 128), (8, 128)]
    assert [v.name for v in recipe.variants] == ["fp32"]
    assert recipe.latency.runs >= 50


def test_shipped_minilm_recipe_is_valid_and_paths_resolve_against_its_folder() -> None:
    recipe = load_recipe(ROOT / "models" / "minilm.yaml")
    assert recipe.name == "minilm"
    assert recipe.data.evaluation == ROOT / "calibration" / "evaluation.jsonl"
    assert recipe.data.evaluation.is_file()


def test_shipped_gpu_recipe_plans_every_gpu_target() -> None:
    from pipeline.recipes import encoder_pipeline

    recipe = load_recipe(ROOT / "models" / "minilm-gpu.yaml")
    steps = {step.id: step.stage.config for step in encoder_pipeline(recipe, 1).steps}
    floor = steps["floor"]
    assert floor.device == "cuda" and floor.precisions == ("fp32", "fp16", "bf16")
    # cuda16 takes the fused graph; the TensorRT graphs are verified on ONNX Runtime first.
    assert steps["optimize[cuda16]"].profile == "ort" and "fp16[cuda16]" in steps
    assert {"verify[trt16:onnx]", "verify[trt8:onnx]", "quantize[trt8]"} <= set(steps)
    engine = steps["compile[trt16]"]
    assert engine.profile == {"min": [1, 1], "opt": [8, 128], "max": [32, 128]}
    assert steps["quantize[trt8]"].method == "static"
    assert recipe.gates.variants == ["cuda32"]
    assert {v.target for v in recipe.variants} == {"ort-cuda", "tensorrt"}


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  task: [feature-extraction\nshapes: {}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert "YAML syntax error at line" in caught.value.message
    assert str(path) in caught.value.message


def test_a_key_given_twice_and_an_empty_recipe_are_refused(tmp_path: Path) -> None:
    """Plain YAML keeps the last of two equal keys; an empty file would build the defaults."""
    path = write(tmp_path, "name: t\nvariants: [{name: a}]\nname: u\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert (
        caught.value.message
        == f"recipe {path} at line 3, column 1: the key 'name' is given twice in one mapping"
    )
    nested = write(tmp_path, "variants:\n  - {name: a, precision: int8, precision: fp32}\n")
    with pytest.raises(RecipeError, match="the key 'precision' is given twice"):
        load_recipe(nested)
    # YAML merge keys still merge, and a key after them still overrides the merged one.
    import yaml

    from pipeline.recipe import _UniqueKeyLoader

    text = "base: &b {name: a, precision: int8}\nv: [{<<: *b}, {<<: *b, name: b}]\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader)["v"] == [
        {"name": "a", "precision": "int8"},
        {"name": "b", "precision": "int8"},
    ]
    for text in ("", "\n  \n", "# only a comment\n"):
        with pytest.raises(RecipeError, match="is empty"):
            load_recipe(write(tmp_path, text))


def test_unknown_field_lists_allowed_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  sorce: /tmp/x\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = caught.value.message
    assert "model: unknown field 'sorce'" in message
    assert "allowed: source, task, pooling" in message


def test_wrong_type_names_field_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "shapes:\n  batch: [1, eight]\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert "shapes.batch[1]: 'eight'" in caught.value.message


def test_literal_error_lists_allowed_values() -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"variants": [{"name": "x", "precision": "fp64"}]}, origin="r")
    assert (
        "r: variants[0].precision: 'fp64' is not allowed (allowed: 'fp32', 'fp16', 'bf16', 'int8' or 'int4')"
        in caught.value.message
    )


def test_unknown_task_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="model.task: 'summarization' is not allowed"):
        parse_recipe({"model": {"task": "summarization"}})


def _int8(quantize: dict) -> dict:
    return {"variants": [{"name": "q", "precision": "int8", "quantize": quantize}]}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "two variants share a name"),
        ({"gates": {"variants": ["nope"]}}, "['nope'] are not variants"),
        ({"gates": {"min_speedup": 2.0}, "latency": {"enabled": False}}, "need latency"),
        ({"gates": {"max_p50_ms": {"b8-s128": 3}}}, "must look like b8s128"),
        ({"shapes": {"batch": [1, 1]}}, "lists a size twice"),
        ({"shapes": {"sequence": [0]}}, "shapes.sequence[0]"),
        ({"variants": [{"name": "Has Space"}]}, "variants[0].name"),
        ({"name": "UPPER"}, "name: 'UPPER'"),
        ({"name": "latest"}, "not 'latest'"),
        ({"gates": {"max_p50_ms": {"b8s256": 100}}}, "['b8s256'] are not timed shapes"),
        ({"verify": {"padding": ["right", "right"]}}, "lists a side twice"),
        ({"shapes": {"sequence": [2, 128]}}, "shorter than 4 tokens"),
        ({"model": {"source": "package:../evil"}}, "package: needs a distribution name"),
        (
            {"variants": [{"name": "a", "optimize": "standard", "fusions": ["attention"]}]},
            "need optimize: ort",
        ),
        ({"variants": [{"name": "a", "fusions": ["ffn", "ffn"]}]}, "lists a fusion twice"),
        ({"variants": [{"name": "a", "fusions": ["softmax"]}]}, "variants[0].fusions[0]"),
        ({"variants": [{"name": "a", "quantize": {}}]}, "quantize: needs precision: int8"),
        (
            {"variants": [{"name": "a", "target": "ort-cuda", "precision": "int8"}]},
            "INT8 Q/DQ graphs do not run on ONNX Runtime's CUDA execution provider; use target: tensorrt",
        ),
        (
            {"variants": [{"name": "a", "target": "tensorrt", "precision": "int8"}]},
            "target tensorrt: INT8 needs quantize: {method: static}",
        ),
        (
            {"variants": [{"name": "a", "target": "tensorrt", "optimize": "ort"}]},
            "contrib ops TensorRT cannot parse; use optimize: standard",
        ),
        ({"variants": [{"name": "a", "compile": {}}]}, "compile: applies to target tensorrt"),
        (
            {"variants": [{"name": "a", "precision": "bf16"}]},
            "precision bf16 needs target: ort-openvino",
        ),
        (
            {"variants": [{"name": "a", "target": "tensorrt", "precision": "bf16"}]},
            "tensorrt has no bfloat16 path",
        ),
        (
            {"variants": [{"name": "a", "target": "ort-openvino", "precision": "fp16"}]},
            "target ort-openvino: fp16 graphs are a GPU form; use precision bf16",
        ),
        (
            {
                "variants": [
                    {
                        "name": "a",
                        "target": "ort-openvino",
                        "precision": "int8",
                        "quantize": {"method": "dynamic"},
                    }
                ]
            },
            "target ort-openvino: INT8 needs quantize: {method: static}",
        ),
        (_int8({"quantizer": "nncf"}), "quantizer: nncf needs method: static"),
        (
            _int8({"method": "static", "quantizer": "nncf", "calibration": {"method": "entropy"}}),
            "calibration.method: quantizer nncf chooses these itself",
        ),
        (
            _int8({"method": "static", "quantizer": "nncf", "per_channel": False}),
            "per_channel: quantizer nncf chooses these itself",
        ),
        (
            {
                "variants": [
                    {
                        "name": "a",
                        "target": "tensorrt",
                        "precision": "int8",
                        "optimize": "standard",
                        "quantize": {"method": "static", "quantizer": "nncf"},
                    }
                ]
            },
            "nncf makes asymmetric activations, which tensorrt does not take",
        ),
        (
            {"variants": [{"name": "a", "target": "tensorrt", "compile": {"optimum": "8x128"}}]},
            "write the optimum shape as b<batch>s<sequence>",
        ),
        (
            {
                "variants": [
                    {"name": "a", "target": "tensorrt", "compile": {"optimization_level": 7}}
                ]
            },
            "optimization_level",
        ),
        (
            {"variants": [{"name": "a", "target": "tpu"}]},
            "'ort-cpu', 'ort-openvino', 'ort-cuda' or 'tensorrt'",
        ),
        (
            {"variants": [{"name": "a", "fusions": ["attention", "mha"]}]},
            "two forms of the same fusion",
        ),
        (_int8({"method": "dynamic", "calibration": {}}), "calibration: needs method: static"),
        (_int8({"method": "kl"}), "'kl' is not allowed"),
        (_int8({"method": "static", "calibration": {"method": "kl"}}), "calibration.method"),
        (_int8({"method": "static", "calibration": {"percentile": 0}}), "greater than 0"),
        (
            _int8({"method": "static", "calibration": {"percentile": 100.5}}),
            "less than or equal to 100",
        ),
        (
            {"variants": [{"name": "a", "static_shapes": True}]},
            "static_shapes: applies to target ort-openvino (this variant has ort-cpu",
        ),
        (
            {
                "data": {"max_length": 256},
                "shapes": {"sequence": [64, 128]},
                "variants": [{"name": "a", "target": "ort-openvino", "static_shapes": True}],
            },
            "variants ['a'] have static_shapes, but data.max_length (256) is longer than every "
            "shape's sequence (shapes.sequence: [64, 128]); add 256 to shapes.sequence",
        ),
        (
            {"variants": [{"name": "a", "keep_float": ["Softmax"]}]},
            "keep_float: needs precision: fp16 (this variant has fp32)",
        ),
        (
            {"variants": [{"name": "a", "precision": "fp16", "keep_float": ["softmax"]}]},
            "keep_float: ['softmax'] are not op types ONNX Runtime knows",
        ),
        (
            {"variants": [{"name": "a", "precision": "fp16", "keep_float": ["Pow", "Pow"]}]},
            "keep_float lists an op type twice",
        ),
        (
            {"verify": {"tolerance": {"max_perplexity_increase": 0.01}}},
            "verify.tolerance: max_perplexity_increase applies to task text-generation only "
            "(this recipe's task: feature-extraction)",
        ),
        (
            {
                "model": {"task": "sequence-classification"},
                "variants": [{"name": "a", "tolerance": {"min_mean_cosine": 0.99}}],
            },
            "variants: a: tolerance: min_mean_cosine applies to task feature-extraction only",
        ),
        (
            {"model": {"task": "token-classification"}, "gates": {"min_worst_cosine": 0.9}},
            "gates ['min_worst_cosine'] apply to task feature-extraction only",
        ),
        (
            {"variants": [{"name": "a", "tolerance": {"max_abs_error": 0}}]},
            "greater than 0",
        ),
        (_int8({"budget": {}}), "set at least one of min_mean_cosine"),
        (_int8({"budget": {"min_mean_cosine": 1.5}}), "budget.min_mean_cosine"),
    ],
)
def test_cross_field_errors(data: dict, fragment: str) -> None:
    with pytest.raises(RecipeError, match=None) as caught:
        parse_recipe(data)
    assert fragment in caught.value.message


def test_static_shapes_are_the_recipe_shapes_and_only_for_those_variants() -> None:
    recipe = parse_recipe(
        {
            "shapes": {"batch": [8, 1], "sequence": [128, 64]},
            "data": {"max_length": 128},
            "variants": [
                {"name": "fixed", "target": "ort-openvino", "static_shapes": True},
                {"name": "dynamic", "target": "ort-openvino"},
            ],
        }
    )
    fixed, dynamic = recipe.variants
    assert recipe.static_shapes(fixed) == ((1, 64), (8, 64), (1, 128), (8, 128))
    assert recipe.static_shapes(dynamic) == ()


def test_int8_defaults_per_target_and_method() -> None:
    recipe = parse_recipe(
        {
            "variants": [
                {"name": "d", "precision": "int8"},
                _int8({"method": "static"})["variants"][0],
            ]
        }
    )
    dynamic, static = recipe.variants
    assert dynamic.fusions == ["mha", "ffn"] and dynamic.session_optimization == "all"
    assert static.quantize is not None and static.quantize.calibration is not None
    assert static.quantize.calibration.method == "minmax"
    assert static.quantize.calibration.samples == 512


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "models" / "minilm.yaml")
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert again == recipe


def test_default_recipe_from_a_path_is_named_after_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "My_Model"
    recipe = default_recipe(str(folder), "sequence-classification")
    assert recipe.name == "my_model"
    assert recipe.model.source == str(folder.resolve())
    assert recipe.model.task == "sequence-classification"


def test_with_model_overrides_source_and_task() -> None:
    recipe = Recipe().with_model("/tmp/somewhere", "token-classification")
    assert recipe.model.source == "/tmp/somewhere"
    assert recipe.model.task == "token-classification"


def test_a_cross_field_error_names_the_section_without_echoing_it() -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"variants": [{"name": "a", "optimize": "standard", "fusions": ["ffn"]}]})
    assert caught.value.message == (
        "recipe: variants[0]: fusions: ['ffn'] need optimize: ort (this variant has optimize: standard)"
    )


def test_variant_defaults_come_from_the_target() -> None:
    fused, plain, chosen = parse_recipe(
        {
            "variants": [
                {"name": "fused"},
                {"name": "plain", "optimize": "none"},
                {"name": "chosen", "fusions": ["attention"], "session_optimization": "all"},
            ]
        }
    ).variants
    assert (fused.optimize, fused.fusions, fused.session_optimization) == (
        "ort",
        ["attention", "ffn"],
        "basic",
    )
    assert (plain.fusions, plain.session_optimization) == ([], "all")
    assert (chosen.fusions, chosen.session_optimization) == (["attention"], "all")
    # The resolved recipe round-trips: printing it and reading it back gives the same variants.
    assert parse_recipe({"variants": [fused.model_dump()]}).variants[0] == fused
    assert fused.quantize is None
    (int8,) = parse_recipe({"variants": [{"name": "q", "precision": "int8"}]}).variants
    assert int8.quantize is not None and int8.quantize.per_channel and not int8.quantize.exclude


def test_outliers_default_and_need_dynamic_int8(tmp_path: Path) -> None:
    from pipeline.recipe import QuantizeSpec

    spec = QuantizeSpec.model_validate({"outliers": {}})
    assert spec.outliers is not None and spec.outliers.threshold == 3.0
    assert spec.outliers.max_channels == 8 and spec.outliers.samples == 128
    with pytest.raises(ValueError, match="outliers: needs method: dynamic"):
        QuantizeSpec.model_validate({"method": "static", "outliers": {}})
    with pytest.raises(ValueError, match="threshold"):
        QuantizeSpec.model_validate({"outliers": {"threshold": 1.0}})


def test_smooth_defaults_and_shares_the_outliers_ranges() -> None:
    from pipeline.recipe import QuantizeSpec

    spec = QuantizeSpec.model_validate({"smooth": {}, "outliers": {}})
    assert spec.smooth is not None and spec.smooth.alpha == 0.75 and spec.smooth.samples == 128
    with pytest.raises(ValueError, match="smooth: needs method: dynamic"):
        QuantizeSpec.model_validate({"method": "static", "smooth": {}})
    with pytest.raises(ValueError, match="alpha"):
        QuantizeSpec.model_validate({"smooth": {"alpha": 0}})
    with pytest.raises(ValueError, match="same samples and seed"):
        QuantizeSpec.model_validate({"smooth": {"samples": 64}, "outliers": {}})
    # As a budget remedy: dynamic only; "all" tries it only where it applies.
    limits = {"min_mean_cosine": 0.999}
    with pytest.raises(ValueError, match="remedies: smooth needs method: dynamic"):
        QuantizeSpec.model_validate(
            {"method": "static", "budget": {**limits, "remedies": ["smooth"]}}
        )
    every = QuantizeSpec.model_validate({"budget": {**limits, "remedies": ["all"]}}).budget
    assert every is not None and "smooth" in every.remedy_names("dynamic")
    assert "smooth" not in every.remedy_names("static")
    # Whose samples the channel ranges are drawn with (build checks the data for that many).
    both = QuantizeSpec.model_validate({"smooth": {"samples": 64}, "outliers": {"samples": 64}})
    assert both.ranges_spec() is both.outliers
    remedy = QuantizeSpec.model_validate({"budget": {**limits, "remedies": ["smooth"]}})
    spec = remedy.ranges_spec()
    assert spec is not None and spec.samples == 128
    static = QuantizeSpec.model_validate(
        {"method": "static", "budget": {**limits, "remedies": ["all"]}}
    )
    assert static.ranges_spec() is None and QuantizeSpec().ranges_spec() is None


def test_the_smooth_remedy_gets_the_channel_ranges_it_reads() -> None:
    from pipeline.recipes import encoder_pipeline

    budget = {"min_mean_cosine": 0.999}
    recipe = parse_recipe(
        {
            "variants": [
                {"name": "a", "precision": "int8", "quantize": {"budget": budget}},
                {
                    "name": "b",
                    "precision": "int8",
                    "quantize": {"budget": {**budget, "remedies": ["smooth"]}},
                },
                {
                    "name": "c",
                    "precision": "int8",
                    "quantize": {"method": "static", "budget": {**budget, "remedies": ["all"]}},
                },
            ]
        }
    )
    steps = {s.id: s for s in encoder_pipeline(recipe, threads=1).steps}
    assert "channels[a]" not in steps and "channels[c]" not in steps
    assert steps["quantize[b]"].inputs["channels"] == "channels[b].channels"
    assert steps["channels[b]"].stage.config.samples == 128
    assert steps["quantize[b]"].stage.config.remedies == ("smooth",)
    assert "smooth" not in steps["quantize[c]"].stage.config.remedies


def test_static_int8_takes_its_targets_quantizer() -> None:
    recipe = parse_recipe(
        {
            "variants": [
                {
                    "name": "ov",
                    "target": "ort-openvino",
                    "precision": "int8",
                    "quantize": {"method": "static"},
                },
                {"name": "cpu", "precision": "int8", "quantize": {"method": "static"}},
                {"name": "dyn", "precision": "int8"},
                {"name": "ov-default", "target": "ort-openvino", "precision": "int8"},
            ]
        },
        origin="r",
    )
    quantizers = {v.name: v.quantize.quantizer for v in recipe.variants if v.quantize}
    assert quantizers == {"ov": "nncf", "cpu": "onnxruntime", "dyn": None, "ov-default": "nncf"}
    # INT8 on ort-openvino is static (Q/DQ) unless the recipe says otherwise.
    assert recipe.variants[3].quantize.method == "static"
    # A dumped recipe (every default spelled out) loads again.
    again = parse_recipe(recipe.model_dump(mode="json"), origin="dumped")
    assert again == recipe


def test_keep_float_reaches_the_fp16_stage() -> None:
    from pipeline.recipes import encoder_pipeline
    from pipeline.stages.fp16 import KEEP_FLOAT

    recipe = parse_recipe(
        {
            "variants": [
                {"name": "a", "precision": "fp16"},
                {"name": "b", "precision": "fp16", "keep_float": ["Softmax", "Gelu"]},
            ]
        }
    )
    steps = {s.id: s for s in encoder_pipeline(recipe, threads=1).steps}
    assert steps["fp16[a]"].stage.config.keep_float == KEEP_FLOAT
    # Sorted: the same set in another order is the same conversion (and cache key).
    assert steps["fp16[b]"].stage.config.keep_float == ("Gelu", "Softmax")


def test_a_variants_tolerance_wins_limit_by_limit() -> None:
    recipe = parse_recipe(
        {
            "verify": {"tolerance": {"min_agreement": 0.9, "max_abs_error": 0.5}},
            "variants": [
                {"name": "a"},
                {"name": "b", "precision": "int8", "tolerance": {"min_agreement": 0.8}},
            ],
        }
    )
    a, b = recipe.variants
    assert recipe.tolerance_for(a) == recipe.verify.tolerance
    held = recipe.tolerance_for(b)
    assert (held.min_agreement, held.max_abs_error, held.min_mean_cosine) == (0.8, 0.5, None)
    assert held.given() == ["max_abs_error", "min_agreement"]


def test_int8_weights_are_7_bit_where_the_cpu_products_saturate(monkeypatch) -> None:
    """x86 without VNNI adds pairs of u8 x s8 products into a saturating 16-bit sum: ort-cpu
    INT8 then takes 7-bit weights unless the recipe says otherwise; other targets never."""
    import pipeline.recipes
    from pipeline.environment import int8_products_saturate
    from pipeline.recipes import encoder_pipeline

    assert int8_products_saturate(["avx2", "fma"]) is (
        __import__("platform").machine().lower() in ("x86_64", "amd64")
    )
    assert not int8_products_saturate(["avx2", "avx512f", "avx512_vnni"])
    assert not int8_products_saturate(["avx2", "avx_vnni"])
    assert not int8_products_saturate(["avx2", "amx_int8"])
    assert not int8_products_saturate(["sse4_2"])  # no AVX2 kernel, no VPMADDUBSW pairs

    variants = [
        {"name": "auto", "precision": "int8"},
        {"name": "eight", "precision": "int8", "quantize": {"reduce_range": False}},
        {"name": "static", "precision": "int8", "quantize": {"method": "static"}},
    ]
    recipe = parse_recipe({"variants": variants})
    for saturates in (True, False):
        monkeypatch.setattr(pipeline.recipes, "int8_products_saturate", lambda s=saturates: s)
        steps = {s.id: s.stage.config for s in encoder_pipeline(recipe, 1).steps}
        assert steps["quantize[auto]"].reduce_range is saturates
        assert steps["quantize[static]"].reduce_range is saturates
        assert steps["quantize[eight]"].reduce_range is False


def test_without_variants_keeps_the_gates_on_what_is_left() -> None:
    recipe = parse_recipe(
        {
            "variants": [
                {"name": "fp32"},
                {"name": "cuda16", "target": "ort-cuda", "precision": "fp16"},
            ],
            "gates": {"min_agreement": 0.99, "variants": ["fp32", "cuda16"]},
        }
    )
    left = recipe.without_variants({"cuda16"})
    assert [v.name for v in left.variants] == ["fp32"] and left.gates.variants == ["fp32"]
    assert left.gates.min_agreement == 0.99
    with pytest.raises(TargetUnavailable, match="none of the recipe's variants can be built"):
        recipe.without_variants({"fp32", "cuda16"})
    gated = parse_recipe(
        {
            "variants": [
                {"name": "fp32"},
                {"name": "cuda16", "target": "ort-cuda", "precision": "fp16"},
            ],
            "gates": {"min_agreement": 0.99, "variants": ["cuda16"]},
        }
    )
    with pytest.raises(TargetUnavailable, match="every variant the gates hold"):
        gated.without_variants({"cuda16"})


def test_cpu_and_gpu_variants_are_not_timed_in_one_build() -> None:
    """PyTorch eager is timed on one device; a CPU variant's speed-up against PyTorch on the
    GPU would mean nothing. One recipe may list both for two machines: what is left after
    --skip-unavailable must run on one device."""
    mixed = parse_recipe(
        {
            "variants": [
                {"name": "fp32"},
                {"name": "cuda16", "target": "ort-cuda", "precision": "fp16"},
                {
                    "name": "trt8",
                    "target": "tensorrt",
                    "precision": "int8",
                    "quantize": {"method": "static"},
                },
            ]
        }
    )
    with pytest.raises(
        RecipeError,
        match=r"variants fp32 \(ort-cpu\) run on the CPU and cuda16 \(ort-cuda\), trt8 "
        r"\(tensorrt\) on the GPU",
    ):
        mixed.require_one_device()
    mixed.without_variants({"cuda16", "trt8"}).require_one_device()
    mixed.without_variants({"fp32"}).require_one_device()
    untimed = parse_recipe({**mixed.model_dump(mode="json"), "latency": {"enabled": False}})
    untimed.require_one_device()
