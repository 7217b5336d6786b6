"""Named pipelines: plain functions from a recipe to the ordered steps of a build.

Read top to bottom, a pipeline is the build: which stage runs, on what, in which order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.backends.runners import GPU_TARGETS
from pipeline.backends.tensorrt_backend import derive_profile
from pipeline.decoders.half import DECODER_KEEP_FLOAT
from pipeline.environment import int8_products_saturate
from pipeline.recipe import (
    DECODER_FUSIONS,
    CalibrationSpec,
    QuantizeSpec,
    Recipe,
    TensorRTSpec,
    VariantSpec,
    target_defaults,
)
from pipeline.stages.base import Step
from pipeline.stages.calibrate import CalibrateConfig, CalibrateStage
from pipeline.stages.channels import ChannelsConfig, ChannelsStage
from pipeline.stages.compile import CompileConfig, CompileStage
from pipeline.stages.export import ExportConfig, ExportStage
from pipeline.stages.floor import FloorConfig, FloorStage, floor_precisions
from pipeline.stages.fp16 import Fp16Config, Fp16Stage
from pipeline.stages.generation import (
    SENSITIVITY_SAMPLES,
    ExportDecoderConfig,
    ExportDecoderStage,
    GenerationFloorConfig,
    GenerationFloorStage,
    GenerationLatencyConfig,
    GenerationLatencyStage,
    GenerationReferenceConfig,
    GenerationReferenceStage,
    HalfDecoderConfig,
    HalfDecoderStage,
    LoadDecoderConfig,
    LoadDecoderStage,
    OptimizeDecoderConfig,
    OptimizeDecoderStage,
    QuantizeDecoderConfig,
    QuantizeDecoderStage,
    VerifyGenerationConfig,
    VerifyGenerationStage,
)
from pipeline.stages.latency import LatencyConfig, LatencyStage
from pipeline.stages.load import LoadConfig, LoadStage
from pipeline.stages.optimize import OptimizeConfig, OptimizeStage
from pipeline.stages.quantize import QuantizeConfig, QuantizeStage
from pipeline.stages.reference import ReferenceConfig, ReferenceStage
from pipeline.stages.verify import VerifyConfig, VerifyStage


@dataclass(frozen=True)
class Plan:
    steps: list[Step]
    #: Variant name -> the input reference of its model folder (``<step>.<output>``).
    variant_models: dict[str, str]


def float_model(variant: VariantSpec) -> str:
    """The variant's float graph: the exported one, or its optimized version."""
    return "export.model" if variant.optimize == "none" else f"optimize[{variant.name}].model"


def onnx_model(variant: VariantSpec) -> str:
    """The variant's final ONNX graph (quantized, FP16 or float)."""
    if variant.precision == "int8":
        return f"quantize[{variant.name}].model"
    if variant.precision == "fp16":
        return f"fp16[{variant.name}].model"
    return float_model(variant)


def variant_model(variant: VariantSpec) -> str:
    """Where a variant's deployable model comes from: its engine on TensorRT, else its graph."""
    if variant.target == "tensorrt":
        return f"compile[{variant.name}].engine"
    return onnx_model(variant)


def graph_label(name: str) -> str:
    """The label of a TensorRT variant's ONNX graph, verified on ONNX Runtime CPU."""
    return f"{name}:onnx"


def compile_config(recipe: Recipe, variant: VariantSpec) -> CompileConfig:
    spec = variant.compile or TensorRTSpec()
    profile = derive_profile(
        recipe.shapes.batch,
        recipe.shapes.sequence,
        recipe.data.max_length,
        recipe.verify.batch_size,
        spec.optimum,
    )
    return CompileConfig(
        variant=variant.name,
        precision=variant.precision,
        profile=profile.as_dict(),
        optimization_level=spec.optimization_level,
        workspace_mb=spec.workspace_mb,
        timing_cache=spec.timing_cache,
    )


def calibrate_config(
    recipe: Recipe, variant: VariantSpec, spec: CalibrationSpec
) -> CalibrateConfig:
    """The calibrate stage's settings: the variant's, its target's defaults, the data's."""
    symmetric = spec.symmetric
    if symmetric is None:
        defaults = target_defaults(variant.target, variant.precision)
        symmetric = bool(defaults.get("symmetric_activations", True))
    return CalibrateConfig(
        method=spec.method,
        symmetric=symmetric,
        # Settings a method does not use stay at their defaults, so they do not split the key.
        percentile=spec.percentile if spec.method == "percentile" else 99.999,
        num_bins=spec.num_bins if spec.method != "minmax" else 2048,
        samples=spec.samples,
        seed=spec.seed,
        batch_size=spec.batch_size,
        max_length=recipe.data.max_length,
        text_field=recipe.data.text_field,
    )


def nncf_draw(recipe: Recipe, spec: CalibrationSpec) -> dict[str, Any]:
    """The calibration texts NNCF is given: drawn and tokenised as the calibrate stage does."""
    return {
        "samples": spec.samples,
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "max_length": recipe.data.max_length,
        "text_field": recipe.data.text_field,
    }


def reduce_range(variant: VariantSpec, q: QuantizeSpec) -> bool:
    """7-bit weights where the recipe asks, else where ONNX Runtime's CPU INT8 products would
    saturate on this machine (no VNNI); not for OpenVINO, TensorRT or NNCF's own scheme."""
    if q.reduce_range is not None:
        return q.reduce_range
    return variant.target == "ort-cpu" and q.quantizer != "nncf" and int8_products_saturate()


def timing_settings(recipe: Recipe, threads: int) -> dict[str, Any]:
    """The latency stage settings every pipeline shares (see stages.latency.TimingConfig)."""
    lat = recipe.latency
    return {
        "shapes": tuple(recipe.shapes.pairs()),
        "warmup": lat.warmup,
        "runs": lat.runs,
        "threads": threads,
        "memory": lat.memory,
        "variants": {v.name: v.session_optimization for v in recipe.variants},
        "text_field": recipe.data.text_field,
    }


def encoder_pipeline(recipe: Recipe, threads: int) -> Plan:
    """load -> export -> reference (-> floor) -> optimize (each variant) -> verify (each) ->
    latency (all)."""
    data = recipe.data
    checkpoint = {"checkpoint": "input:checkpoint", "info": "load.info"}
    steps = [
        Step(
            "load",
            LoadStage(LoadConfig(task=recipe.model.task, pooling=recipe.model.pooling)),
            {"checkpoint": "input:checkpoint"},
        ),
        Step("export", ExportStage(ExportConfig(opset=recipe.export.opset)), checkpoint),
        Step(
            "reference",
            ReferenceStage(
                ReferenceConfig(
                    batch_size=recipe.verify.batch_size,
                    padding=tuple(recipe.verify.padding),
                    max_length=data.max_length,
                    max_samples=data.max_samples,
                    text_field=data.text_field,
                    label_field=data.label_field,
                    threads=threads,
                )
            ),
            {**checkpoint, "evaluation": "input:evaluation"},
        ),
    ]
    gpu = any(v.target in GPU_TARGETS for v in recipe.variants)
    if recipe.verify.floor:
        config_f = FloorConfig(
            precisions=floor_precisions(recipe.verify.floor, gpu),
            device="cuda" if gpu else "cpu",
            threads=threads,
        )
        steps.append(
            Step("floor", FloorStage(config_f), {**checkpoint, "reference": "reference.reference"})
        )
    for variant in recipe.variants:
        if variant.optimize != "none":
            # Sorted: the passes run in a fixed order, so the listed order must not change the key.
            config_o = OptimizeConfig(
                profile=variant.optimize,
                fusions=tuple(sorted(variant.fusions)),
                # ONNX Runtime's CPU session would fuse the SkipLayerNormalization this variant
                # left out (its kernel is the slower; see pipeline.passes.residual_sum).
                residual_sum=variant.target == "ort-cpu"
                and "skip-layernorm" not in variant.fusions
                and variant.session_optimization in ("extended", "all"),
            )
            steps.append(
                Step(
                    f"optimize[{variant.name}]",
                    OptimizeStage(config_o),
                    {"model": "export.model", "info": "load.info"},
                )
            )
        if variant.precision == "fp16":
            steps.append(
                Step(
                    f"fp16[{variant.name}]",
                    Fp16Stage(
                        Fp16Config(keep_float=tuple(variant.keep_float))
                        if variant.keep_float is not None
                        else Fp16Config()
                    ),
                    {"model": float_model(variant)},
                )
            )
        if variant.precision == "int8":
            q = variant.quantize or QuantizeSpec()
            config_q = QuantizeConfig(
                method=q.method,
                per_channel=q.per_channel,
                reduce_range=reduce_range(variant, q),
                exclude=tuple(q.exclude),
                budget=q.budget.limits() if q.budget is not None else None,
                remedies=q.budget.remedy_names(q.method) if q.budget is not None else (),
                outliers=((q.outliers.threshold, q.outliers.max_channels) if q.outliers else None),
                smooth=q.smooth.alpha if q.smooth else None,
                session_optimization=variant.session_optimization,
                threads=threads,
                target=variant.target,
                # Only the budget search runs the model; without one the shapes would split the key.
                shapes=recipe.static_shapes(variant) if q.budget is not None else (),
                quantizer=q.quantizer or "onnxruntime",
                draw=nncf_draw(recipe, q.calibration or CalibrationSpec())
                if q.quantizer == "nncf"
                else None,
            )
            inputs_q = {"model": float_model(variant), "reference": "reference.reference"}
            ranged = q.ranges_spec()
            if ranged is not None:
                config_r = ChannelsConfig(
                    samples=ranged.samples,
                    seed=ranged.seed,
                    max_length=data.max_length,
                    text_field=data.text_field,
                    threads=threads,
                )
                steps.append(
                    Step(
                        f"channels[{variant.name}]",
                        ChannelsStage(config_r),
                        {
                            "model": float_model(variant),
                            "calibration": "input:calibration",
                            "info": "load.info",
                        },
                    )
                )
                inputs_q["channels"] = f"channels[{variant.name}].channels"
            if q.quantizer == "nncf":
                # NNCF measures its own ranges on the drawn texts: no calibrate stage.
                inputs_q["calibration"] = "input:calibration"
                inputs_q["info"] = "load.info"
            elif q.method == "static":
                config_c = calibrate_config(recipe, variant, q.calibration or CalibrationSpec())
                steps.append(
                    Step(
                        f"calibrate[{variant.name}]",
                        CalibrateStage(config_c),
                        {
                            "model": float_model(variant),
                            "calibration": "input:calibration",
                            "info": "load.info",
                        },
                    )
                )
                inputs_q["calibration"] = f"calibrate[{variant.name}].calibration"
            steps.append(Step(f"quantize[{variant.name}]", QuantizeStage(config_q), inputs_q))
    for variant in recipe.variants:
        if variant.target == "tensorrt":
            steps.append(
                Step(
                    f"compile[{variant.name}]",
                    CompileStage(compile_config(recipe, variant)),
                    {"model": onnx_model(variant)},
                )
            )
    models = {v.name: variant_model(v) for v in recipe.variants}
    for variant in recipe.variants:
        if variant.target == "tensorrt":
            # The graph TensorRT is given is verified on ONNX Runtime CPU too, so a wrong graph
            # is told apart from a wrong engine (and is known before any engine exists).
            steps.append(
                Step(
                    f"verify[{graph_label(variant.name)}]",
                    VerifyStage(
                        VerifyConfig(
                            variant=graph_label(variant.name),
                            target="ort-cpu",
                            precision=variant.precision,
                            session_optimization="all",
                            threads=threads,
                        )
                    ),
                    {"model": onnx_model(variant), "reference": "reference.reference"},
                )
            )
        config = VerifyConfig(
            variant=variant.name,
            target=variant.target,
            precision=variant.precision,
            session_optimization=variant.session_optimization,
            threads=threads,
            shapes=recipe.static_shapes(variant),
        )
        steps.append(
            Step(
                f"verify[{variant.name}]",
                VerifyStage(config),
                {"model": models[variant.name], "reference": "reference.reference"},
            )
        )
    if recipe.latency.enabled:
        config_l = LatencyConfig(
            **timing_settings(recipe, threads),
            targets={v.name: v.target for v in recipe.variants if v.target != "ort-cpu"},
            precisions={v.name: v.precision for v in recipe.variants if v.target == "ort-openvino"},
            static_shapes={
                v.name: recipe.static_shapes(v) for v in recipe.variants if v.static_shapes
            },
        )
        inputs = {
            **checkpoint,
            "evaluation": "input:evaluation",
            **{f"model:{name}": ref for name, ref in models.items()},
        }
        steps.append(Step("latency", LatencyStage(config_l), inputs))
    return Plan(steps=steps, variant_models=models)


def decoder_method(variant: VariantSpec) -> str | None:
    """The decoder quantizer's method for a variant (None: float)."""
    if variant.precision == "int4":
        return "int4"
    if variant.precision == "int8":
        q = variant.quantize or QuantizeSpec()
        return "int8-weight" if q.method == "weight-only" else "int8"
    return None


def decoder_pipeline(recipe: Recipe, threads: int) -> Plan:
    """load -> export (prefill + decode) -> reference (-> floor) -> optimize, fp16 or quantize
    (each) -> verify (each) -> latency.

    Step ids are the encoder pipeline's, so reports and checks read both alike.
    """
    gen = recipe.generation
    data = recipe.data
    checkpoint = {"checkpoint": "input:checkpoint", "info": "load.info"}
    steps = [
        Step(
            "load",
            LoadDecoderStage(LoadDecoderConfig(task=recipe.model.task)),
            {"checkpoint": "input:checkpoint"},
        ),
        Step(
            "export", ExportDecoderStage(ExportDecoderConfig(opset=recipe.export.opset)), checkpoint
        ),
        Step(
            "reference",
            GenerationReferenceStage(
                GenerationReferenceConfig(
                    prompts=gen.prompts,
                    prompt_tokens=gen.prompt_tokens,
                    new_tokens=gen.new_tokens,
                    batch_size=gen.batch_size,
                    perplexity_texts=gen.perplexity_texts,
                    max_length=data.max_length,
                    top_k=gen.top_k,
                    text_field=data.text_field,
                    threads=threads,
                )
            ),
            {**checkpoint, "evaluation": "input:evaluation"},
        ),
    ]
    if gen.floor:
        steps.append(
            Step(
                "floor",
                GenerationFloorStage(
                    GenerationFloorConfig(precisions=tuple(gen.floor), threads=threads)
                ),
                {**checkpoint, "reference": "reference.reference"},
            )
        )
    models = {}
    for variant in recipe.variants:
        graphs = "export.model"
        if variant.optimize == "ort":
            fuse = OptimizeDecoderConfig(
                # In their run order: the same fusions listed another way share a result.
                fusions=tuple(f for f in DECODER_FUSIONS if f in variant.fusions),
                session_optimization=variant.session_optimization,
                separate=tuple(sorted(variant.quantize.exclude))
                if "pack" in variant.fusions and variant.quantize is not None
                else (),
            )
            steps.append(
                Step(
                    f"optimize[{variant.name}]",
                    OptimizeDecoderStage(fuse),
                    {"model": "export.model", "info": "load.info"},
                )
            )
            graphs = f"optimize[{variant.name}].model"
        if variant.precision == "fp16":
            steps.append(
                Step(
                    f"fp16[{variant.name}]",
                    HalfDecoderStage(
                        HalfDecoderConfig(
                            keep_float=DECODER_KEEP_FLOAT
                            if variant.keep_float is None
                            else tuple(variant.keep_float)
                        )
                    ),
                    {"model": graphs},
                )
            )
            graphs = f"fp16[{variant.name}].model"
        method = decoder_method(variant)
        if method is None:
            models[variant.name] = graphs
            continue
        q = variant.quantize or QuantizeSpec()
        config = QuantizeDecoderConfig(
            method=method,
            # Settings a method does not use stay at their defaults, so they do not split the key.
            block_size=q.block_size if method != "int8" else 32,
            exclude=tuple(sorted(q.exclude)),
            compute=q.compute if method != "int8" else "int8",
            keep_grid=q.keep_grid,
            reduce_range=method == "int8" and reduce_range(variant, q),
            # Grid weights are exact: no sensitivity is measured, so no calibration text is read.
            sensitivity_samples=0 if q.keep_grid else SENSITIVITY_SAMPLES,
            text_field="text" if q.keep_grid else data.text_field,
        )
        measured = (
            {}
            if q.keep_grid
            else {"checkpoint": "input:checkpoint", "calibration": "input:calibration"}
        )
        steps.append(
            Step(
                f"quantize[{variant.name}]",
                QuantizeDecoderStage(config),
                {"model": graphs, **measured},
            )
        )
        models[variant.name] = f"quantize[{variant.name}].model"
    for variant in recipe.variants:
        steps.append(
            Step(
                f"verify[{variant.name}]",
                VerifyGenerationStage(
                    VerifyGenerationConfig(
                        variant=variant.name,
                        precision=variant.precision,
                        session_optimization=variant.session_optimization,
                        threads=threads,
                    )
                ),
                {"model": models[variant.name], "reference": "reference.reference"},
            )
        )
    if recipe.latency.enabled:
        config_l = GenerationLatencyConfig(
            **timing_settings(recipe, threads), new_tokens=gen.new_tokens
        )
        inputs = {
            **checkpoint,
            "evaluation": "input:evaluation",
            **{f"model:{name}": ref for name, ref in models.items()},
        }
        steps.append(Step("latency", GenerationLatencyStage(config_l), inputs))
    return Plan(steps=steps, variant_models=models)
