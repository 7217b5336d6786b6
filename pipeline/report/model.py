"""``report.json``: the machine-readable summary of a build, a pure function of its manifest.

The schema is versioned (``schema_version``) and validated on write and on read. It holds, per
contender (PyTorch eager and every variant): accuracy against PyTorch, latency per shape with
speed-up, size and peak memory; plus checks, stage timings, cache hits and the environment.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import InputError
from pipeline.manifest import Check, Manifest
from pipeline.stages.latency import PYTORCH

REPORT_SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Latency(_Frozen):
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float
    runs: int
    #: PyTorch eager's median over this contender's median (None for PyTorch itself).
    speedup: float | None = None


class Contender(_Frozen):
    name: str
    kind: str  # "pytorch" or "variant"
    target: str
    precision: str
    #: Accuracy against PyTorch FP32 (None for PyTorch itself).
    accuracy: dict[str, Any] | None
    latency: dict[str, Latency]
    size_bytes: int | None
    peak_rss_bytes: int | None
    task_metric: float | None = None
    #: How the graph was prepared: profile, fusions asked for, fused ops made, session level.
    graph: dict[str, Any] | None = None
    #: INT8 variants: method, what was quantized, kept float, most sensitive nodes, budget.
    quantization: dict[str, Any] | None = None


class StageTiming(_Frozen):
    step: str
    cached: bool
    seconds: float
    key: str


class Report(_Frozen):
    schema_version: int = REPORT_SCHEMA_VERSION
    run_id: str
    created: str
    tforge_version: str
    recipe_name: str
    model: dict[str, Any]
    task: str
    shapes: list[str]
    threads: int | None
    #: The shape at which peak RSS was measured (the largest timed), if it was.
    memory_shape: str | None = None
    contenders: list[Contender]
    checks: list[Check]
    passed: bool
    stages: list[StageTiming]
    cached_steps: int
    environment: dict[str, Any]
    notes: list[str]


def build_report(manifest: Manifest) -> Report:
    recipe = manifest.recipe
    load = manifest.stage("load")
    reference = manifest.stage("reference")
    latency = manifest.stage("latency")
    lat = latency.stats if latency else {}
    shapes: list[str] = lat.get("shapes", [])
    timings = lat.get("contenders", {})
    rss = lat.get("peak_rss_bytes", {})

    def latencies(name: str) -> dict[str, Latency]:
        out = {}
        for shape in shapes:
            stats = timings[name][shape]
            base = timings[PYTORCH][shape]["p50_ms"]
            speedup = None if name == PYTORCH else round(base / stats["p50_ms"], 3)
            out[shape] = Latency(
                p50_ms=stats["p50_ms"],
                p90_ms=stats["p90_ms"],
                p99_ms=stats["p99_ms"],
                mean_ms=stats["mean_ms"],
                throughput=stats["throughput"],
                runs=stats["runs"],
                speedup=speedup,
            )
        return out

    reference_metric = None
    contenders = []
    for variant in recipe["variants"]:
        verify = manifest.stage(f"verify[{variant['name']}]")
        accuracy = {
            k: v for k, v in (verify.stats if verify else {}).items() if k not in ("size_bytes",)
        }
        reference_metric = accuracy.pop("reference_task_metric", reference_metric)
        contenders.append(
            Contender(
                name=variant["name"],
                kind="variant",
                target=variant["target"],
                precision=variant["precision"],
                accuracy=accuracy,
                latency=latencies(variant["name"]) if timings else {},
                size_bytes=verify.stats.get("size_bytes") if verify else None,
                peak_rss_bytes=rss.get(variant["name"]),
                task_metric=accuracy.get("task_metric"),
                graph=_graph(manifest, variant),
                quantization=_quantization(manifest, variant["name"]),
            )
        )
    pytorch = Contender(
        name=PYTORCH,
        kind="pytorch",
        target="torch-cpu",
        precision="fp32",
        accuracy=None,
        latency=latencies(PYTORCH) if timings else {},
        size_bytes=lat.get("size_bytes", {}).get(PYTORCH),
        peak_rss_bytes=rss.get(PYTORCH),
        task_metric=reference_metric,
    )
    notes = []
    if load is not None:
        note = load.stats.get("note")
        if note:
            notes.append(note)
    if reference is not None and reference.stats.get("truncated"):
        notes.append(
            f"{reference.stats['truncated']} evaluation texts were longer than {reference.stats['max_length']} tokens and were truncated."
        )
    source = next((i for i in manifest.inputs if i.name == "checkpoint"), None)
    return Report(
        run_id=manifest.run_id,
        created=manifest.created,
        tforge_version=manifest.tforge_version,
        recipe_name=recipe["name"],
        model={
            "source": recipe["model"]["source"],
            "path": source.path if source else None,
            "sha256": source.sha256 if source else None,
            **(
                {
                    k: load.stats[k]
                    for k in ("model_type", "family", "layers", "hidden", "heads", "parameters")
                }
                if load
                else {}
            ),
        },
        task=recipe["model"]["task"],
        shapes=shapes,
        threads=lat.get("threads"),
        memory_shape=lat.get("memory_shape"),
        contenders=[pytorch, *contenders],
        checks=manifest.checks,
        passed=not manifest.failed_checks,
        stages=[
            StageTiming(step=s.step, cached=s.cached, seconds=round(s.seconds, 3), key=s.key)
            for s in manifest.stages
        ],
        cached_steps=sum(s.cached for s in manifest.stages),
        environment=manifest.environment,
        notes=notes,
    )


def _graph(manifest: Manifest, variant: dict[str, Any]) -> dict[str, Any]:
    export = manifest.stage("export")
    optimize = manifest.stage(f"optimize[{variant['name']}]")
    graph: dict[str, Any] = {
        "optimize": variant.get("optimize", "none"),
        "fusions": variant.get("fusions", []),
        "session_optimization": variant.get("session_optimization"),
        "exported_nodes": export.stats.get("nodes") if export else None,
    }
    if optimize is not None:
        graph["nodes"] = optimize.stats.get("nodes")
        graph["fused_ops"] = optimize.stats.get("fusions", {})
    return graph


def _quantization(manifest: Manifest, name: str) -> dict[str, Any] | None:
    quantize = manifest.stage(f"quantize[{name}]")
    if quantize is None:
        return None
    keys = (
        "method",
        "weight_matmuls",
        "quantized_matmuls",
        "kept_float",
        "sensitivity",
        "budget",
        "calibration",
        "symmetric",
    )
    out = {k: quantize.stats[k] for k in keys if k in quantize.stats}
    calibrate = manifest.stage(f"calibrate[{name}]")
    if calibrate is not None:
        out["calibration_data"] = {
            k: calibrate.stats.get(k) for k in ("samples", "tokens", "truncated", "max_length")
        }
    return out


def render_json(report: Report) -> str:
    return report.model_dump_json(indent=2) + "\n"


def read_report(text: str, origin: str) -> Report:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{origin} is not JSON ({error.msg})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != REPORT_SCHEMA_VERSION:
        raise InputError(
            f"{origin} has report schema version {version!r}; this tforge reads {REPORT_SCHEMA_VERSION}"
        )
    try:
        return Report.model_validate(data)
    except ValidationError as error:
        raise InputError(f"{origin} is not a tforge report: {error.errors()[0]['msg']}") from None


def json_schema() -> dict[str, Any]:
    return Report.model_json_schema()
