"""``report.json``: the machine-readable summary of a build, a pure function of its manifest.

The schema is versioned (``schema_version``) and validated on write and on read. It holds, per
contender (PyTorch eager and every variant): accuracy against PyTorch, latency per shape with
speed-up, size and peak memory; plus checks, stage timings, cache hits, the environment, and
(when the build was given a baseline) the comparison with it. ``docs/report.schema.json`` is the
JSON Schema, generated from these models; ``docs/reports.md`` describes it.

Versions: 1 (no ``comparison``); 2 adds ``comparison`` and per-variant ``error_quantiles``
(and later ``device_bytes`` and ``floor``); 3 adds ``inputs`` (the sha256 of the checkpoint and
the data, so ``tforge compare`` can tell builds on other data apart), and a variant's
``task_metric_drop``. Versions 1 and 2 are read by upgrading them (each only added fields); any other
version is refused, naming the versions this tforge reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.backends.runners import GPU_TARGETS
from pipeline.errors import InputError, read_json, read_text
from pipeline.manifest import Check, Manifest
from pipeline.stages.latency import PYTORCH

REPORT_SCHEMA_VERSION = 3
#: Older versions this tforge still reads, and how each is brought to the current one.
READABLE_VERSIONS = (1, 2, 3)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Latency(_Frozen):
    """One contender at one shape: statistics of the timed runs, in milliseconds."""

    p50_ms: float = Field(description="Median latency of the timed runs.")
    p90_ms: float = Field(description="90th percentile latency.")
    p99_ms: float = Field(description="99th percentile latency.")
    mean_ms: float
    throughput: float = Field(description="Sequences per second at the median latency.")
    runs: int = Field(description="Timed runs (after warm-up).")
    speedup: float | None = Field(
        None, description="PyTorch eager's p50 over this contender's p50 (None for PyTorch)."
    )


class Contender(_Frozen):
    """PyTorch eager (the reference) or one variant of the recipe."""

    name: str
    kind: str = Field(description='"pytorch" or "variant".')
    target: str = Field(description="Where it runs, e.g. ort-cpu, torch-cpu.")
    precision: str = Field(description="fp32, fp16, int8 or int4.")
    accuracy: dict[str, Any] | None = Field(
        description=(
            "Against PyTorch FP32 on the evaluation data, worst padding side: max_abs_error, "
            "mean_abs_error, nonfinite_outputs, mean_cosine/worst_cosine (feature-extraction), "
            "agreement, task_metric (labelled data), error_quantiles (per-text error at the "
            "0th, 5th, ... 100th percentile; error_kind names it), per_side. Text-generation: "
            "token_match, sequence_match, agreement (teacher-forced), max_abs_error / "
            "mean_abs_error (logits at PyTorch's top-k tokens), nonfinite_outputs, perplexity, "
            "reference_perplexity, perplexity_increase, first_divergence. None for PyTorch."
        )
    )
    latency: dict[str, Latency] = Field(
        description="Per shape, e.g. b8s128; text-generation: prefill-b1s32 (the whole prompt) "
        "and decode-b1s32 (one step; throughput in tokens/s)."
    )
    size_bytes: int | None = Field(description="Model file(s) on disk.")
    peak_rss_bytes: int | None = Field(
        description="Peak RSS of a fresh process that loads it and runs the memory shape."
    )
    device_bytes: int | None = Field(
        None,
        description="GPU contenders: device memory a fresh process holds after loading it and "
        "running the memory shape (its allocators' peak; the CUDA context not counted).",
    )
    task_metric: float | None = None
    graph: dict[str, Any] | None = Field(
        None,
        description="Profile, fusions asked for, fused ops made (fusion counts), node counts, session level; static_shapes: the shapes an ort-openvino variant is compiled for (absent: dynamic axes); float16 (fp16 variants): the Casts left, the op types kept in float32, and a decoder's KV cache element types.",
    )
    quantization: dict[str, Any] | None = Field(
        None,
        description="INT8: method, calibration, quantized and kept-float nodes, sensitivity, budget search.",
    )


class StageTiming(_Frozen):
    step: str
    cached: bool = Field(description="Taken from the artifact store instead of run.")
    seconds: float = Field(description="Run time (when built, for a cached step).")
    key: str = Field(description="Content hash of the step's inputs, config and code version.")


class Delta(_Frozen):
    """One figure of one variant, baseline against candidate."""

    variant: str
    metric: str
    shape: str | None = None
    baseline: float | None
    candidate: float | None
    change: float | None = Field(
        description="Accuracy: candidate - baseline. Latency and size: relative (0.1 = 10% more)."
    )
    limit: float | None = Field(description="Largest change that is not a regression.")
    noise: float | None = Field(
        None, description="Latency: relative change explained by run-to-run noise."
    )
    status: Literal["ok", "improved", "noise", "regression", "missing", "new"]
    note: str | None = None

    def __bool__(self) -> bool:
        return self.status not in ("regression", "missing")


class Comparison(_Frozen):
    """A candidate build against a baseline: what got worse beyond the thresholds."""

    baseline_run: str
    candidate_run: str
    thresholds: dict[str, Any]
    deltas: list[Delta]
    passed: bool
    remeasured: int = Field(0, description="Times the candidate's latency was re-measured.")
    warnings: list[str] = []

    @property
    def regressions(self) -> list[Delta]:
        return [d for d in self.deltas if not d]


class Report(_Frozen):
    schema_version: int = REPORT_SCHEMA_VERSION
    run_id: str
    created: str = Field(description="UTC time the build started (ISO 8601).")
    tforge_version: str
    recipe_name: str
    model: dict[str, Any] = Field(
        description="Source, path, sha256, model_type, family, layers, hidden, heads, parameters."
    )
    task: str
    inputs: dict[str, str] | None = Field(
        None,
        description="sha256 of the build's inputs by name: checkpoint, evaluation, calibration "
        "(schema 3; None in older reports).",
    )
    shapes: list[str] = Field(description="Timed shapes, b<batch>s<sequence>.")
    threads: int | None = Field(description="Intra-op threads for every contender.")
    memory_shape: str | None = Field(None, description="The shape at which peak RSS was measured.")
    contenders: list[Contender]
    checks: list[Check] = Field(description="Fusion counts, tolerances, budgets and gates.")
    passed: bool = Field(description="Every check passed (and the comparison, when present).")
    stages: list[StageTiming]
    cached_steps: int
    environment: dict[str, Any] = Field(description="Versions, hardware and platform.")
    notes: list[str]
    comparison: Comparison | None = Field(None, description="Against the baseline, when given.")
    floor: dict[str, dict[str, Any]] | None = Field(
        None,
        description="PyTorch itself cast to fp16 or bf16 (verify.floor; text-generation: "
        "generation.floor), keyed by precision, verified against PyTorch FP32 with the "
        "variants' accuracy figures (encoders: max_abs_error, mean_cosine, agreement...; "
        "text-generation: token_match, sequence_match, agreement, perplexity_increase...): "
        "what any 16-bit deployment of the model gives up, the scale the variants' figures "
        "read against. Encoders also record the device it ran on; a build with GPU variants "
        "runs it on the GPU and adds fp32 there.",
    )

    def ran_on_gpu(self) -> bool:
        """A contender ran on a GPU: a GPU variant, or PyTorch on CUDA beside them."""
        return any(c.target in GPU_TARGETS or c.target.endswith("-cuda") for c in self.contenders)

    def gpu(self) -> dict[str, Any] | None:
        """The GPU a GPU build ran on (the first CUDA sees, the one tforge uses), from
        ``environment.hardware.gpus``; None for a CPU build, or a manifest from before GPUs
        were recorded."""
        gpus = self.environment.get("hardware", {}).get("gpus") or []
        return dict(gpus[0]) if gpus and self.ran_on_gpu() else None

    def gpu_label(self) -> str | None:
        """ "NVIDIA H200 (driver 570.86)" for a GPU build; None as :meth:`gpu`."""
        gpu = self.gpu()
        return f"{gpu['name']} (driver {gpu['driver']})" if gpu else None


def build_report(manifest: Manifest) -> Report:
    recipe = manifest.recipe
    load = manifest.stage("load")
    reference = manifest.stage("reference")
    floor = manifest.stage("floor")
    latency = manifest.stage("latency")
    lat = latency.stats if latency else {}
    shapes: list[str] = lat.get("shapes", [])
    timings = lat.get("contenders", {})
    rss = lat.get("peak_rss_bytes", {})
    device = lat.get("device_bytes", {})

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
                device_bytes=device.get(variant["name"]),
                task_metric=accuracy.get("task_metric"),
                graph=_graph(manifest, variant),
                quantization=_quantization(manifest, variant["name"]),
            )
        )
    pytorch = Contender(
        name=PYTORCH,
        kind="pytorch",
        # With GPU variants, PyTorch eager is timed on the GPU.
        target=f"torch-{lat.get('pytorch_device', 'cpu')}",
        precision="fp32",
        accuracy=None,
        latency=latencies(PYTORCH) if timings else {},
        size_bytes=lat.get("size_bytes", {}).get(PYTORCH),
        peak_rss_bytes=rss.get(PYTORCH),
        device_bytes=device.get(PYTORCH),
        task_metric=reference_metric,
    )
    notes = []
    if load is not None:
        note = load.stats.get("note")
        if note:
            notes.append(note)
    for stage in manifest.stages:
        if stage.step.startswith("optimize[") and stage.stats.get("fallback"):
            variant = stage.step[len("optimize[") : -1]
            for fusion, why in stage.stats["fallback"].items():
                notes.append(f"{variant}: the {fusion} fusion was dropped: {why}")
        if stage.step.startswith("quantize[") and stage.stats.get("grid_found"):
            variant = stage.step[len("quantize[") : -1]
            notes.append(
                f"{variant}: the weights already lie on {stage.stats['grid_found']}-bit block "
                "grids (a GGUF model's) and were rounded onto new ones; quantize.keep_grid: true "
                "stores them exactly"
            )
    for contender in contenders:
        fixed = (contender.graph or {}).get("static_shapes")
        if fixed:
            notes.append(
                f"{contender.name}: compiled for fixed input shapes {', '.join(fixed)} "
                "(static_shapes); shorter inputs are padded up to the nearest, and verification "
                "ran them that way"
            )
    cpu_half = [c.name for c in contenders if c.precision == "fp16" and c.target == "ort-cpu"]
    if cpu_half:
        notes.append(
            f"{', '.join(cpu_half)}: float16 graphs on ort-cpu: ONNX Runtime's x86 CPU "
            "provider has no float16 MatMul; it runs the MatMuls in float32 on the float16 weights and "
            "inputs and rounds their outputs to float16, so verification measured float16's "
            "rounding of weights and activations, and the latency is not a float16 speed (the "
            "graph is the form for a GPU)"
        )
    notes += _floor_notes(manifest, floor.stats if floor is not None else {})
    notes += _limit_below_floor(manifest, floor.stats if floor is not None else {})
    notes += _seven_bit_notes(manifest, contenders)
    notes += [
        f"{name}: left out of this build (--skip-unavailable): {why}"
        for name, why in manifest.build.get("skipped_variants", {}).items()
    ]
    if reference is not None and reference.stats.get("truncated"):
        notes.append(
            f"{reference.stats['truncated']} evaluation texts were longer than {reference.stats['max_length']} tokens and were truncated."
        )
    source = next((i for i in manifest.inputs if i.name == "checkpoint"), None)
    comparison = manifest.build.get("comparison")
    compared = Comparison.model_validate(comparison) if comparison else None
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
        inputs={i.name: i.sha256 for i in manifest.inputs},
        shapes=shapes,
        threads=lat.get("threads"),
        memory_shape=lat.get("memory_shape"),
        contenders=[pytorch, *contenders],
        checks=manifest.checks,
        passed=not manifest.failed_checks and (compared is None or compared.passed),
        stages=[
            StageTiming(step=s.step, cached=s.cached, seconds=round(s.seconds, 3), key=s.key)
            for s in manifest.stages
        ],
        cached_steps=sum(s.cached for s in manifest.stages),
        environment=manifest.environment,
        notes=notes,
        comparison=compared,
        floor=dict(floor.stats) if floor is not None else None,
    )


def _floor_notes(manifest: Manifest, floor: dict[str, Any]) -> list[str]:
    """A token-match gate that failed above what PyTorch itself keeps in 16 bits: the limit
    asks more than the model's own near-ties allow, which the user should know before
    hunting for a compiler bug."""
    kept = {p: f.get("token_match") for p, f in floor.items() if f.get("token_match") is not None}
    if not kept:
        return []
    precision = max(kept, key=lambda p: kept[p])
    return [
        f"{c.variant}: gates.min_token_match {c.limit:g} is above PyTorch's own token match in "
        f"{precision} ({kept[precision]:.3f}, the floor): on these prompts even a 16-bit "
        "PyTorch flips near-ties; gate agreement or perplexity, or a token match below the floor"
        for c in manifest.checks
        if c.source == "gate"
        and c.metric == "token_match"
        and not c.passed
        and c.limit > kept[precision]
    ]


def _seven_bit_notes(manifest: Manifest, contenders: list[Contender]) -> list[str]:
    """INT8 variants whose 7-bit weights the build chose for this CPU (the recipe left
    quantize.reduce_range unset): said, since the same recipe gives 8-bit weights elsewhere."""
    unset = {
        v["name"]
        for v in manifest.recipe["variants"]
        if (v.get("quantize") or {}).get("reduce_range") is None
    }
    chosen = [
        c.name
        for c in contenders
        if c.name in unset
        and (c.quantization or {}).get("weight_bits") == 7
        # A budget search may choose 7-bit weights itself (its reduce_range remedy).
        and ((c.quantization or {}).get("budget") or {}).get("remedy") != "reduce_range"
    ]
    if not chosen:
        return []
    return [
        f"{', '.join(chosen)}: 7-bit INT8 weights, because this CPU has no VNNI: ONNX Runtime's "
        "8-bit products would saturate in 16 bits here (quantize.reduce_range: false forces "
        "8-bit weights; a CPU with VNNI gets them by default)"
    ]


#: Encoder accuracy figures a check may hold a variant to that the floor measures too.
_FLOOR_FIGURES = ("max_abs_error", "mean_cosine", "worst_cosine", "agreement")


def _limit_below_floor(manifest: Manifest, floor: dict[str, Any]) -> list[str]:
    """An encoder variant that failed a limit that PyTorch itself, cast to 16 bits, fails
    too: the limit asks more than the model keeps in 16 bits at all, which no compiler can
    give back (told before the user hunts for a conversion bug)."""
    # A TensorRT variant's ONNX graph (``name:onnx``) has its variant's precision, and was
    # verified on ONNX Runtime CPU.
    variants = {v["name"]: v for v in manifest.recipe["variants"]}
    notes = []
    for check in manifest.checks:
        if check.passed or check.metric not in _FLOOR_FIGURES or check.shape is not None:
            continue
        name, _, graph = check.variant.partition(":")
        variant = variants.get(name, {})
        precision = variant.get("precision", "fp32")
        device = "cuda" if variant.get("target") in GPU_TARGETS and not graph else "cpu"
        # Only a floor measured where the variant ran says what that device keeps.
        if precision not in floor or floor[precision].get("device", "cpu") != device:
            continue
        level = floor[precision].get(check.metric)
        fails = level is None or (
            level < check.limit if check.kind == "min" else level > check.limit
        )
        if fails:
            shown = "no figure" if level is None else f"{level:.6g}"
            notes.append(
                f"{check.variant}: {check.source} {check.metric} {check.limit:g} is beyond "
                f"PyTorch's own in {precision} ({shown}, the floor): the model itself does not "
                f"keep it in {precision}; set the limit from the floor"
            )
    return notes


def _graph(manifest: Manifest, variant: dict[str, Any]) -> dict[str, Any]:
    export = manifest.stage("export")
    optimize = manifest.stage(f"optimize[{variant['name']}]")
    graph: dict[str, Any] = {
        "optimize": variant.get("optimize", "none"),
        "fusions": variant.get("fusions", []),
        "session_optimization": variant.get("session_optimization"),
        "exported_nodes": export.stats.get("nodes") if export else None,
    }
    verify = manifest.stage(f"verify[{variant['name']}]")
    fixed = verify.config.get("shapes") if verify is not None else None
    if fixed:
        graph["static_shapes"] = [f"b{b}s{s}" for b, s in fixed]
    if optimize is not None:
        graph["nodes"] = optimize.stats.get("nodes")
        graph["fused_ops"] = optimize.stats.get("fusions", {})
    half = manifest.stage(f"fp16[{variant['name']}]")
    if half is not None:
        graph["float16"] = {
            k: half.stats[k] for k in ("casts", "kept_float", "cache") if k in half.stats
        }
    graph_check = manifest.stage(f"verify[{variant['name']}:onnx]")
    if graph_check is not None:
        # The ONNX graph TensorRT was given, on ONNX Runtime CPU.
        graph["onnx_accuracy"] = {
            k: graph_check.stats.get(k) for k in ("max_abs_error", "mean_cosine", "agreement")
        }
    compiled = manifest.stage(f"compile[{variant['name']}]")
    if compiled is not None:
        graph["engine"] = {
            k: compiled.stats.get(k)
            for k in (
                "tensorrt",
                "gpu",
                "compute_capability",
                "engine_bytes",
                "build_seconds",
                "profile",
            )
        }
    return graph


def _quantization(manifest: Manifest, name: str) -> dict[str, Any] | None:
    quantize = manifest.stage(f"quantize[{name}]")
    if quantize is None:
        return None
    keys = (
        "method",
        "weight_bits",
        "weight_matmuls",
        "quantized_matmuls",
        "quantized_tables",
        "kept_float",
        "sensitivity",
        "budget",
        "calibration",
        "symmetric",
        "quantizer",
        "preset",
        "calibration_data",
        "block_size",
        "compute",
        "grid",
        "outliers",
        "smooth",
    )
    out = {k: quantize.stats[k] for k in keys if k in quantize.stats}
    channels = manifest.stage(f"channels[{name}]")
    for key in ("outliers", "smooth"):
        if channels is not None and key in out:
            out[key] = {**out[key], "samples": channels.stats.get("samples")}
    calibrate = manifest.stage(f"calibrate[{name}]")
    if calibrate is not None:
        out["calibration_data"] = {
            k: calibrate.stats.get(k) for k in ("samples", "tokens", "truncated", "max_length")
        }
    return out


def render_json(report: Report) -> str:
    return report.model_dump_json(indent=2) + "\n"


def load_report(path: Path) -> tuple[Report, Path | None]:
    """A build's report from a run folder, its manifest.json or a report.json.

    A manifest (or a run folder holding one) is re-rendered by this tforge; a bare report.json is
    read as written. Returns the report and the manifest's path when there is one.
    """
    if path.is_dir():
        for name in ("manifest.json", "report.json"):
            if (path / name).is_file():
                return load_report(path / name)
        raise InputError(
            f"{path} holds neither manifest.json nor report.json",
            "pass a run folder under artifacts/runs/, or a report.json",
        )
    text = read_text(
        path,
        "a tforge report or manifest",
        "pass a run folder under artifacts/runs/, its manifest.json or a report.json",
    )
    data = read_json(text, str(path))
    if isinstance(data, dict) and "recipe" in data and "stages" in data:
        return build_report(Manifest.parse(text, str(path))), path
    return read_report(text, str(path)), None


def read_report(text: str, origin: str) -> Report:
    data = read_json(text, origin)
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise InputError(
            f"{origin} has report schema version {version!r}; this tforge reads versions {readable}",
            "re-render it with `tforge report RUN` from its manifest, or use the tforge that wrote it",
        )
    if version != REPORT_SCHEMA_VERSION and isinstance(data, dict):
        # Each later version only added fields: an older report is a valid current one
        # without them.
        data = {**data, "schema_version": REPORT_SCHEMA_VERSION}
    try:
        return Report.model_validate(data)
    except ValidationError as error:
        raise InputError(f"{origin} is not a tforge report: {error.errors()[0]['msg']}") from None


def json_schema() -> dict[str, Any]:
    return Report.model_json_schema()
