"""Run a recipe: resolve its inputs, run the plan through the store, write the run folder.

A step whose key is in the store is not run again: its record is reused and marked cached.
The run folder is assembled in a temporary folder and renamed into place at the end, so a build
that fails leaves no half-written run behind (completed stages stay cached, which is correct:
they are complete results).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pipeline import __version__, environment
from pipeline.artifacts import (
    Artifact,
    ArtifactStore,
    OutputRecord,
    StageRecord,
    canonical_json,
    link_or_copy,
    stage_key,
    write_text_atomic,
)
from pipeline.calibration import read_samples, shipped_data
from pipeline.errors import InputError
from pipeline.manifest import InputRecord, Manifest
from pipeline.progress import NullProgress, Progress
from pipeline.recipe import Recipe
from pipeline.recipes import Plan, encoder_pipeline
from pipeline.report import build_report, render_json, render_markdown
from pipeline.report.checks import evaluate
from pipeline.report.model import Report
from pipeline.stages.base import BuildContext, Step
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


@dataclass(frozen=True)
class BuildOutcome:
    manifest: Manifest
    report: Report
    run_dir: Path

    @property
    def passed(self) -> bool:
        return not self.manifest.failed_checks


def resolve_inputs(recipe: Recipe) -> dict[str, Artifact]:
    """The build's own inputs, checked and hashed before any stage runs."""
    folder = resolve_source(recipe.model.source)
    data = recipe.data
    evaluation = data.evaluation or shipped_data("evaluation")
    # Read the evaluation data now: a bad file fails the build before minutes of export.
    read_samples(
        evaluation,
        kind="evaluation",
        text_field=data.text_field,
        label_field=data.label_field,
        limit=data.max_samples,
    )
    return {
        "checkpoint": checkpoint_artifact(folder),
        "evaluation": Artifact.of("evaluation", evaluation),
    }


def plan_for(recipe: Recipe) -> Plan:
    return encoder_pipeline(recipe, recipe.latency.threads or environment.default_threads())


def _key(step: Step, inputs: dict[str, Artifact]) -> str:
    stage = step.stage
    return stage_key(
        stage.name,
        stage.key_config(),
        {n: a.sha256 for n, a in inputs.items()},
        environment.facets(stage.facets),
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
            outputs={
                name: OutputRecord(path=path, sha256="", size=0)
                for name, path in result.outputs.items()
            },
            stats=result.stats,
            seconds=round(seconds, 4),
        )
        record = store.commit(tmp, record)
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
        inputs = {name: produced[ref] for name, ref in step.inputs.items()}
        force = options.no_cache or (options.remeasure and step.stage.name == "latency")
        record = run_step(step, inputs, ctx, store, force)
        for name, artifact in store.artifacts(record).items():
            produced[f"{step.id}.{name}"] = artifact
        ctx.progress.step_finished(record)
        yield record


@dataclass(frozen=True)
class PlannedStep:
    step: str
    stage: str
    inputs: dict[str, str]
    #: "cached", "run", or "run" with the reason it cannot be known yet.
    status: str


def describe_plan(recipe: Recipe, artifacts: Path) -> list[PlannedStep]:
    """The steps a build would run and which the store already holds (``--dry-run``)."""
    store = ArtifactStore(artifacts)
    plan = plan_for(recipe)
    external = resolve_inputs(recipe)
    produced: dict[str, Artifact] = {f"input:{name}": a for name, a in external.items()}
    rows = []
    for step in plan.steps:
        refs = list(step.inputs.values())
        if all(ref in produced for ref in refs):
            inputs = {name: produced[ref] for name, ref in step.inputs.items()}
            hit = store.lookup(_key(step, inputs))
            if hit is not None:
                produced.update({f"{step.id}.{n}": a for n, a in store.artifacts(hit).items()})
            status = "cached" if hit is not None else "run"
        else:
            status = "run (after its inputs)"
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
            raise InputError(
                f"shapes.sequence {too_long} exceed the model's maximum of {info.max_length} tokens",
                f"use sequence lengths up to {info.max_length}",
            )


def new_run_id(store: ArtifactStore, name: str) -> str:
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
    if final.exists():
        raise InputError(f"run folder {final} already exists", "pass another --run-id")
    tmp = store.runs / f".tmp-{manifest.run_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for variant, step in manifest.variant_models.items():
            step_id, _, output = step.partition(".")
            record = manifest.stage(step_id)
            if record is None:
                raise RuntimeError(f"variant {variant}: step {step_id} is not in the manifest")
            link_or_copy(store.output_path(record, output), tmp / "models" / variant)
        write_text_atomic(tmp / "manifest.json", manifest.model_dump_json(indent=2) + "\n")
        write_text_atomic(tmp / "report.json", render_json(report))
        write_text_atomic(tmp / "report.md", render_markdown(report))
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latest = store.runs / "latest"
    with contextlib.suppress(OSError):
        link = store.runs / f".latest-{os.getpid()}"
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
    external = resolve_inputs(recipe)
    plan = plan_for(recipe)
    ctx = BuildContext(progress=progress or NullProgress())
    records: list[StageRecord] = []
    for record in run_plan(plan, external, ctx, store, options):
        records.append(record)
        if record.step == "load":
            check_against_checkpoint(recipe, CheckpointInfo.read(store.artifacts(record)["info"]))
    recipe_json = recipe.model_dump(mode="json")
    manifest = Manifest(
        tforge_version=__version__,
        run_id=options.run_id or new_run_id(store, recipe.name),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        recipe=recipe_json,
        recipe_sha256=hashlib.sha256(canonical_json(recipe_json).encode()).hexdigest(),
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
            "steps": len(records),
            "cached_steps": sum(r.cached for r in records),
        },
    )
    report = build_report(manifest)
    run_dir = write_run(store, manifest, report)
    return BuildOutcome(manifest=manifest, report=report, run_dir=run_dir)
