"""Built-in parity checks and the recipe's gates, evaluated on a build's stage figures.

Tolerances come from the architecture spec (per precision) with the recipe's overrides; gates
come from the recipe. Neither lives in the stages, so changing a limit re-evaluates a build
without re-running anything.
"""

from __future__ import annotations

from typing import Any, Literal

from pipeline.architectures import family_of
from pipeline.artifacts import StageRecord
from pipeline.budget import FIGURES as BUDGET_FIGURES
from pipeline.manifest import Check, check
from pipeline.passes import FUSED_OPS
from pipeline.recipe import Recipe, ToleranceSpec
from pipeline.recipes import graph_label
from pipeline.stages.latency import PYTORCH


def _by_step(stages: list[StageRecord]) -> dict[str, StageRecord]:
    return {s.step: s for s in stages}


#: Built-in limits of a decoder variant against PyTorch FP32, per precision. FP32 runs the same
#: math in another runtime: its teacher-forced decisions must agree and its logits stay close.
#: FP16 rounds every weight, activation and cached key and value: a decision may flip only at a
#: near tie, and perplexity moves by noise (SmolLM2-135M: agreement 0.9995, perplexity -0.03%;
#: PyTorch itself in fp16: 0.9966, +0.01%). Its logits' absolute error scales with the logits
#: (GPT-2's run in the hundreds, where one float16 step is 0.125), so that is no built-in limit.
#: Quantized decoders have no built-in limit but finite logits: how many tokens a product may
#: lose is a gate in its recipe (min_token_match, max_perplexity_increase), or a limit it sets
#: in ``verify.tolerance`` (every variant) or a variant's own ``tolerance``.
DECODER_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"agreement": 0.99, "max_abs_error": 1e-2},
    "fp16": {"agreement": 0.98, "perplexity_increase": 0.01},
}

#: A verified figure -> the tolerance field (pipeline.recipe.ToleranceSpec) that sets its
#: limit, and the limit's kind.
LIMITS: dict[str, tuple[str, Literal["min", "max"]]] = {
    "max_abs_error": ("max_abs_error", "max"),
    "mean_cosine": ("min_mean_cosine", "min"),
    "agreement": ("min_agreement", "min"),
    "perplexity_increase": ("max_perplexity_increase", "max"),
}


def _limit_checks(
    label: str,
    figures: dict[str, Any],
    metrics: tuple[str, ...],
    override: ToleranceSpec,
    defaults: dict[str, float],
) -> list[Check]:
    """No non-finite output, then each of ``metrics`` against the recipe's limit where it sets
    one, else the built-in one in ``defaults``; a metric with neither is not checked (a
    quantized decoder's agreement, unless the recipe holds it to one)."""
    checks = [
        check("tolerance", label, "nonfinite_outputs", figures["nonfinite_outputs"], 0, "max")
    ]
    for metric in metrics:
        field, kind = LIMITS[metric]
        limit = getattr(override, field)
        if limit is None:
            limit = defaults.get(metric)
        if limit is not None:
            checks.append(check("tolerance", label, metric, figures.get(metric), limit, kind))
    return checks


def decoder_tolerance_checks(recipe: Recipe, stages: list[StageRecord]) -> list[Check]:
    steps = _by_step(stages)
    checks = []
    for variant in recipe.variants:
        checks += _limit_checks(
            variant.name,
            steps[f"verify[{variant.name}]"].stats,
            ("agreement", "max_abs_error", "perplexity_increase"),
            recipe.tolerance_for(variant),
            DECODER_TOLERANCES.get(variant.precision, {}),
        )
    return checks


def tolerance_checks(recipe: Recipe, stages: list[StageRecord]) -> list[Check]:
    if recipe.generates:
        return decoder_tolerance_checks(recipe, stages)
    steps = _by_step(stages)
    load = steps["load"].stats
    family = family_of(str(load["model_type"]))
    checks = []
    verified = [(v.name, v) for v in recipe.variants]
    # A TensorRT variant's ONNX graph, verified on ONNX Runtime CPU, meets the same tolerances.
    verified += [(graph_label(v.name), v) for v in recipe.variants if v.target == "tensorrt"]
    for label, variant in verified:
        figures = steps[f"verify[{label}]"].stats
        default = family.tolerances[variant.precision]
        cosine = ("mean_cosine",) if "mean_cosine" in figures else ()  # feature-extraction
        checks += _limit_checks(
            label,
            figures,
            ("max_abs_error", *cosine, "agreement"),
            recipe.tolerance_for(variant),
            {
                "max_abs_error": default.max_abs_error,
                "mean_cosine": default.min_mean_cosine,
                "agreement": default.min_agreement,
            },
        )
    return checks


def _latency(steps: dict[str, StageRecord]) -> dict[str, Any] | None:
    record = steps.get("latency")
    return record.stats if record else None


def gate_checks(recipe: Recipe, stages: list[StageRecord]) -> list[Check]:
    gates = recipe.gates
    steps = _by_step(stages)
    latency = _latency(steps)
    checks: list[Check] = []
    names = gates.variants or [v.name for v in recipe.variants]
    accuracy_gates: tuple[tuple[str, str, Literal["min", "max"]], ...] = (
        ("min_mean_cosine", "mean_cosine", "min"),
        ("min_worst_cosine", "worst_cosine", "min"),
        ("min_agreement", "agreement", "min"),
        ("min_task_metric", "task_metric", "min"),
        ("max_task_metric_drop", "task_metric_drop", "max"),
        ("max_abs_error", "max_abs_error", "max"),
        ("min_token_match", "token_match", "min"),
        ("max_perplexity_increase", "perplexity_increase", "max"),
    )
    for name in names:
        figures = steps[f"verify[{name}]"].stats
        for field, metric, kind in accuracy_gates:
            limit = getattr(gates, field)
            if limit is not None:
                note = (
                    None
                    if metric in figures
                    else (
                        "the evaluation data has no labels"
                        if metric in ("task_metric", "task_metric_drop")
                        else "not measured for this task"
                    )
                )
                checks.append(
                    check("gate", name, metric, figures.get(metric), limit, kind, note=note)
                )
        if gates.max_size_mb is not None:
            checks.append(
                check(
                    "gate", name, "size_mb", figures["size_bytes"] / 1e6, gates.max_size_mb, "max"
                )
            )
        if latency is None:
            continue
        contenders = latency["contenders"]
        for shape in latency["shapes"]:
            p50 = contenders[name][shape]["p50_ms"]
            if gates.max_p50_ms is not None:
                ceiling = (
                    gates.max_p50_ms
                    if isinstance(gates.max_p50_ms, float | int)
                    else gates.max_p50_ms.get(shape)
                )
                if ceiling is not None:
                    checks.append(
                        check("gate", name, "p50_ms", p50, float(ceiling), "max", shape=shape)
                    )
            if gates.min_speedup is not None:
                speedup = contenders[PYTORCH][shape]["p50_ms"] / p50
                checks.append(
                    check(
                        "gate",
                        name,
                        "speedup",
                        speedup,
                        gates.min_speedup,
                        "min",
                        shape=shape,
                    )
                )
    return checks


def fusion_checks(recipe: Recipe, stages: list[StageRecord]) -> list[Check]:
    """Each fusion a variant asked for made as many fused ops as its architecture expects.

    A family that cannot fuse something expects 0 of it and is not checked (its note in the
    report says why); an architecture without a spec expects nothing.
    """
    steps = _by_step(stages)
    load = steps["load"].stats
    family = family_of(str(load["model_type"]))
    layers = int(load["layers"])
    checks = []
    for variant in recipe.variants:
        record = steps.get(f"optimize[{variant.name}]")
        if record is None or variant.optimize != "ort":
            continue
        if "expected" in record.stats:
            # A decoder's optimize stage says what its architecture should give, per fusion. A
            # fusion ONNX Runtime could not run was dropped on purpose (the report's notes say
            # why); a shortfall without that reason fails.
            dropped = record.stats.get("fallback", {})
            for fusion, count in record.stats["expected"].items():
                if fusion in dropped:
                    continue
                checks.append(
                    check(
                        "fusion",
                        variant.name,
                        fusion,
                        record.stats["made"].get(fusion, 0),
                        count,
                        "min",
                        note="fused ops in the decode graph",
                    )
                )
            continue
        made = record.stats["fusions"]
        for fusion in variant.fusions:
            per_layer = family.expects(fusion)
            if not per_layer:
                continue
            op, _ = FUSED_OPS[fusion]
            checks.append(
                check(
                    "fusion",
                    variant.name,
                    op,
                    made.get(op, 0),
                    per_layer * layers,
                    "min",
                    note=f"{fusion}: {per_layer} per layer x {layers} layers",
                )
            )
    return checks


def budget_checks(recipe: Recipe, stages: list[StageRecord]) -> list[Check]:
    """An INT8 variant with an accuracy budget meets it (on verify's figures, both sides)."""
    steps = _by_step(stages)
    checks = []
    for variant in recipe.variants:
        if variant.quantize is None or variant.quantize.budget is None:
            continue
        figures = steps[f"verify[{variant.name}]"].stats
        search = steps[f"quantize[{variant.name}]"].stats.get("budget", {})
        note = f"{search.get('kept_float', '?')} of {search.get('of', '?')} nodes kept in float"
        for key, limit in variant.quantize.budget.limits().items():
            figure = BUDGET_FIGURES[key]
            checks.append(
                check("budget", variant.name, figure, figures.get(figure), limit, "min", note=note)
            )
    return checks


def evaluate(recipe: Recipe, stages: list[StageRecord]) -> list[Check]:
    return (
        fusion_checks(recipe, stages)
        + tolerance_checks(recipe, stages)
        + budget_checks(recipe, stages)
        + gate_checks(recipe, stages)
    )
