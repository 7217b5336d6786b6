"""Run a recipe: resolve its inputs, run the plan through the store, write the run folder.

A step whose key is in the store is not run again: its record is reused and marked cached.
The run folder is assembled in a temporary folder and renamed into place at the end, so a build
that fails leaves no half-written run behind (completed stages stay cached, which is correct:
they are complete results).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import __version__, environment, targets
from pipeline.artifacts import (
    Artifact,
    ArtifactStore,
    StageRecord,
    canonical_json,
    link_or_copy,
    stage_key,
    temp_prefix,
    write_text_atomic,
)
from pipeline.calibration import draw_samples, read_samples, shipped_data
from pipeline.errors import InputError, RecipeError
from pipeline.manifest import InputRecord, Manifest
from pipeline.progress import NullProgress, Progress
from pipeline.recipe import Recipe, check_name
from pipeline.recipes import Plan, decoder_method, decoder_pipeline, encoder_pipeline
from pipeline.report import build_report, render_all
from pipeline.report.checks import evaluate
from pipeline.report.compare import Thresholds, confirm_latency
from pipeline.report.model import Report
from pipeline.stages.base import BuildContext, Step
from pipeline.stages.generation import SENSITIVITY_SAMPLES, DecoderInfo
from pipeline.stages.load import CheckpointInfo, checkpoint_artifact, resolve_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    artifacts: Path = Path("artifacts")
    #: Re-run every step even when the store has its result.
    no_cache: bool = False
    #: Re-run the latency step only (timings are the one result worth re-taking).
    remeasure: bool = False
    run_id: str | None = None
    #: Compare the build with this report (a previous build's) and fail on a regression.
    baseline: Report | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    #: Re-measure latency up to this many times before declaring a latency regression.
    confirm: int = 0
    #: Leave out the variants this machine cannot build (a missing target, bf16 without
    #: bfloat16, NNCF absent), said in the log and the report, instead of refusing the build.
    skip_unavailable: bool = False


@dataclass(frozen=True)
class BuildOutcome:
    manifest: Manifest
    report: Report
    run_dir: Path

    @property
    def passed(self) -> bool:
        return self.report.passed


def checkpoint_input(recipe: Recipe) -> Artifact:
    """The model the recipe names, checked and hashed: a checkpoint folder's files, or the one
    GGUF file a decoder package ships."""
    if not recipe.generates:
        return checkpoint_artifact(resolve_source(recipe.model.source))
    from pipeline.decoders.load import resolve_decoder

    path = resolve_decoder(recipe.model.source)
    if path.is_file():
        return Artifact.of("checkpoint", path)
    artifact = checkpoint_artifact(path)
    if not artifact.size:
        raise InputError(f"{path} holds no checkpoint files", "pass a save_pretrained folder")
    return artifact


def resolve_inputs(recipe: Recipe) -> dict[str, Artifact]:
    """The build's own inputs, checked and hashed before any stage runs."""
    data = recipe.data
    evaluation = data.evaluation or shipped_data("evaluation")
    # Read the data now: a bad file fails the build before minutes of export. The calibration
    # set is checked when the recipe names one (static INT8 and outlier-splitting variants read it).
    read_samples(
        evaluation,
        kind="evaluation",
        text_field=data.text_field,
        label_field=data.label_field,
        limit=data.max_samples,
    )
    inputs = {
        "checkpoint": checkpoint_input(recipe),
        "evaluation": Artifact.of("evaluation", evaluation),
    }
    counts = [
        spec.samples
        for v in recipe.variants
        if v.quantize is not None
        for spec in (v.quantize.calibration, v.quantize.ranges_spec())
        if spec is not None
    ]
    # A quantized decoder's sensitivity is measured on the first calibration texts (not for
    # weights kept on their own grid).
    decoder_quantized = recipe.model.task == "text-generation" and any(
        decoder_method(v) and not (v.quantize and v.quantize.keep_grid) for v in recipe.variants
    )
    if counts:
        calibration = data.calibration or shipped_data("calibration")
        # Drawn now as the stage will: a short or broken file fails before the export.
        draw_samples(
            calibration, kind="calibration", count=max(counts), seed=0, text_field=data.text_field
        )
        inputs["calibration"] = Artifact.of("calibration", calibration)
    elif decoder_quantized:
        calibration = data.calibration or shipped_data("calibration")
        read_samples(
            calibration, kind="calibration", text_field=data.text_field, limit=SENSITIVITY_SAMPLES
        )
        inputs["calibration"] = Artifact.of("calibration", calibration)
    elif data.calibration is not None:
        read_samples(data.calibration, kind="calibration", text_field=data.text_field, limit=1)
    return inputs


def plan_for(recipe: Recipe) -> Plan:
    threads = recipe.latency.threads or environment.default_threads()
    if recipe.generates:
        return decoder_pipeline(recipe, threads)
    return encoder_pipeline(recipe, threads)


def _key(step: Step, inputs: dict[str, Artifact]) -> str:
    stage = step.stage
    return stage_key(
        f"{stage.name}@{stage.version}",
        stage.key_config(),
        {n: a.sha256 for n, a in inputs.items()},
        environment.facets(stage.key_facets()),
    )


def run_step(
    step: Step, inputs: dict[str, Artifact], ctx: BuildContext, store: ArtifactStore, force: bool
) -> StageRecord:
    key = _key(step, inputs)
    if not force and (hit := store.lookup(key)) is not None:
        record = hit.as_cached(step.id)
        log.info("stage %-16s key %s cached   (%.2fs when built)", step.id, key[:12], hit.seconds)
        return record
    step.stage.requires(inputs)
    with store.writing(key) as tmp:
        start = time.perf_counter()
        result = step.stage.run(ctx, inputs, tmp)
        seconds = time.perf_counter() - start
        record = StageRecord(
            step=step.id,
            stage=step.stage.name,
            key=key,
            config=step.stage.key_config(),
            inputs={name: a.sha256 for name, a in inputs.items()},
            outputs={},
            stats=result.stats,
            seconds=round(seconds, 4),
        )
        record = store.commit(tmp, record, result.outputs, replace=force)
    log.info("stage %-16s key %s built    %.2fs", step.id, key[:12], seconds)
    return record


def run_plan(
    plan: Plan,
    external: dict[str, Artifact],
    ctx: BuildContext,
    store: ArtifactStore,
    options: BuildOptions,
) -> Iterator[StageRecord]:
    produced = {f"input:{name}": artifact for name, artifact in external.items()}
    for index, step in enumerate(plan.steps):
        ctx.progress.step_started(index, len(plan.steps), step.id)
        inputs = _wire(step, produced)
        if inputs is None:
            raise RuntimeError(f"plan error: {step.id} runs before one of its inputs {step.inputs}")
        # By step id: the encoder and decoder pipelines time in different stages under one id.
        force = options.no_cache or (options.remeasure and step.id == "latency")
        record = run_step(step, inputs, ctx, store, force)
        produced.update(_outputs(step, store, record))
        ctx.progress.step_finished(record)
        yield record


def _wire(step: Step, produced: dict[str, Artifact]) -> dict[str, Artifact] | None:
    """The step's inputs from what earlier steps produced; None while one is still missing."""
    if not all(ref in produced for ref in step.inputs.values()):
        return None
    return {name: produced[ref] for name, ref in step.inputs.items()}


def _outputs(step: Step, store: ArtifactStore, record: StageRecord) -> dict[str, Artifact]:
    return {f"{step.id}.{name}": artifact for name, artifact in store.artifacts(record).items()}


@dataclass(frozen=True)
class PlannedStep:
    step: str
    stage: str
    inputs: dict[str, str]
    #: "cached", "run", or "run" with the reason it cannot be known yet.
    status: str


def recipe_sha256(recipe_json: dict[str, Any], external: Mapping[str, Artifact]) -> str:
    """The recipe's hash, the same wherever the project sits: the paths of its inputs (the
    checkpoint folder, the data files; made absolute when the recipe was read) count by their
    content hashes, recorded beside it in the manifest's inputs, not by where they are."""
    portable = json.loads(json.dumps(recipe_json))
    fields = {
        ("model", "source"): "checkpoint",
        ("data", "evaluation"): "evaluation",
        ("data", "calibration"): "calibration",
    }
    for (section, key), name in fields.items():
        value = portable.get(section, {}).get(key)
        if not value or str(value).startswith("package:"):
            continue
        # A file the build does not read (a calibration set no variant uses) counts by name.
        portable[section][key] = (
            f"sha256:{external[name].sha256}" if name in external else f"unread:{Path(value).name}"
        )
    return hashlib.sha256(canonical_json(portable).encode()).hexdigest()


def describe_plan(
    recipe: Recipe, artifacts: Path, no_cache: bool = False, remeasure: bool = False
) -> list[PlannedStep]:
    """The steps a build would run and which the store already holds (``--dry-run``), as
    ``--no-cache`` and ``--remeasure`` would change them."""
    store = ArtifactStore(artifacts)
    plan = plan_for(recipe)
    external = resolve_inputs(recipe)
    produced: dict[str, Artifact] = {f"input:{name}": a for name, a in external.items()}
    rows = []
    for step in plan.steps:
        inputs = _wire(step, produced)
        hit = store.lookup(_key(step, inputs)) if inputs is not None else None
        forced = (
            "--no-cache"
            if no_cache
            else "--remeasure"
            if remeasure and step.id == "latency"
            else None
        )
        if hit is not None:
            # The outputs a forced step makes again are the same (content-addressed), so what
            # follows it is planned as the store holds it.
            produced.update(_outputs(step, store, hit))
        status = (
            f"run ({forced})"
            if forced and hit is not None
            else "cached"
            if hit is not None
            else ("run" if inputs is not None else "run (after its inputs)")
        )
        rows.append(
            PlannedStep(
                step=step.id, stage=step.stage.describe(), inputs=step.inputs, status=status
            )
        )
    return rows


def check_against_checkpoint(recipe: Recipe, info: CheckpointInfo) -> None:
    """Recipe limits that only the checkpoint can judge (its maximum sequence length)."""
    if info.max_length is not None and recipe.latency.enabled:
        too_long = [s for s in recipe.shapes.sequence if s > info.max_length]
        if too_long:
            raise RecipeError(
                f"shapes.sequence {too_long} exceed the model's maximum of {info.max_length} tokens",
                f"use sequence lengths up to {info.max_length}",
            )


def check_against_decoder(recipe: Recipe, info: DecoderInfo) -> None:
    """Prompts plus new tokens must fit the decoder's positions, before minutes of export."""
    limit = info.max_positions
    if limit is None:
        return
    gen = recipe.generation
    longest = max([gen.prompt_tokens, *(recipe.shapes.sequence if recipe.latency.enabled else [])])
    # The last new token is chosen, never fed back: the highest position is longest + new - 2.
    if longest + gen.new_tokens - 1 > limit:
        raise RecipeError(
            f"prompts of up to {longest} tokens plus {gen.new_tokens} new tokens exceed the "
            f"model's {limit} positions",
            "shorten shapes.sequence, generation.prompt_tokens or generation.new_tokens",
        )
    if recipe.data.max_length > limit:
        raise RecipeError(
            f"data.max_length {recipe.data.max_length} exceeds the model's {limit} positions",
            f"set data.max_length to at most {limit}",
        )


def choose_run_id(store: ArtifactStore, requested: str | None, name: str) -> str:
    """The run folder's name, checked before any work: a given one must be new and file-safe."""
    if requested is not None:
        try:
            check_name(requested)
        except ValueError as error:
            raise RecipeError(f"--run-id {requested!r}: {error}") from None
        if (store.runs / requested).exists():
            raise InputError(
                f"run folder {store.runs / requested} already exists", "pass another --run-id"
            )
        return requested
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_id = f"{stamp}-{name}"
    suffix = 1
    while (store.runs / run_id).exists():
        suffix += 1
        run_id = f"{stamp}-{name}-{suffix}"
    return run_id


def write_run(store: ArtifactStore, manifest: Manifest, report: Report) -> Path:
    """Assemble the run folder in a temporary folder, then rename it into place."""
    final = store.runs / manifest.run_id
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(manifest.run_id), dir=store.runs))
    try:
        for variant, step in manifest.variant_models.items():
            step_id, _, output = step.partition(".")
            record = manifest.stage(step_id)
            if record is None:
                raise RuntimeError(f"variant {variant}: step {step_id} is not in the manifest")
            link_or_copy(store.output_path(record, output), tmp / "models" / variant)
        write_text_atomic(tmp / "manifest.json", manifest.model_dump_json(indent=2) + "\n")
        for name, text in render_all(report).items():
            write_text_atomic(tmp / name, text)
        try:
            os.replace(tmp, final)
        except OSError:
            raise InputError(
                f"run folder {final} appeared while this build ran", "pass another --run-id"
            ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latest = store.runs / "latest"
    with contextlib.suppress(OSError):
        link = store.runs / f"{temp_prefix('latest')}link"
        link.unlink(missing_ok=True)
        link.symlink_to(manifest.run_id)
        os.replace(link, latest)
    return final


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def build(recipe: Recipe, options: BuildOptions, progress: Progress | None = None) -> BuildOutcome:
    """Run ``recipe`` end to end and write ``runs/<run-id>/``; checks are recorded, not raised."""
    clock = _Clock()
    store = ArtifactStore(options.artifacts)
    store.ensure_writable()
    store.remove_stale_temporaries()
    run_id = choose_run_id(store, options.run_id, recipe.name)
    skipped: dict[str, str] = {}
    if options.skip_unavailable:
        recipe, skipped = targets.buildable(recipe)
        for name, why in skipped.items():
            log.warning("skipping variant %s: %s", name, why)
    # Before any work: a variant whose target this machine lacks fails now, naming what is missing.
    targets.require(
        {v.target for v in recipe.variants}, {(v.target, v.precision) for v in recipe.variants}
    )
    recipe.require_one_device()
    if any(v.quantize is not None and v.quantize.quantizer == "nncf" for v in recipe.variants):
        targets.require_nncf()
    external = resolve_inputs(recipe)
    plan = plan_for(recipe)
    ctx = BuildContext(progress=progress or NullProgress(), artifacts_root=options.artifacts)
    records: list[StageRecord] = []
    for record in run_plan(plan, external, ctx, store, options):
        records.append(record)
        if record.step == "load":
            info = store.artifacts(record)["info"]
            if recipe.generates:
                check_against_decoder(recipe, DecoderInfo.read(info))
            else:
                check_against_checkpoint(recipe, CheckpointInfo.read(info))
    recipe_json = recipe.model_dump(mode="json")
    created = datetime.now(UTC).isoformat(timespec="seconds")

    def manifest_of(records: list[StageRecord], extra: dict[str, object]) -> Manifest:
        return Manifest(
            tforge_version=__version__,
            run_id=run_id,
            created=created,
            recipe=recipe_json,
            recipe_sha256=recipe_sha256(recipe_json, external),
            inputs=[
                InputRecord(name=a.name, path=str(a.path), sha256=a.sha256, size=a.size)
                for a in external.values()
            ],
            stages=records,
            variant_models=plan.variant_models,
            checks=evaluate(recipe, records),
            environment=environment.describe(),
            build={
                "seconds": clock.seconds(),
                "peak_rss_bytes": environment.peak_rss_bytes(),
                **({"skipped_variants": skipped} if skipped else {}),
                **extra,
            },
        )

    manifest = manifest_of(records, {})
    if options.baseline is not None:

        def remeasure() -> Report:
            nonlocal records
            again = replace(options, remeasure=True)
            records = list(run_plan(plan, external, ctx, store, again))
            return build_report(manifest_of(records, {}))

        # The build's own checks are in its report and fail it already: not listed again.
        comparison, _ = confirm_latency(
            options.baseline,
            build_report(manifest),
            options.thresholds,
            remeasure,
            options.confirm,
            checks=False,
        )
        manifest = manifest_of(records, {"comparison": comparison.model_dump(mode="json")})
    report = build_report(manifest)
    run_dir = write_run(store, manifest, report)
    return BuildOutcome(manifest=manifest, report=report, run_dir=run_dir)
