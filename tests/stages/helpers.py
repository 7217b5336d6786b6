"""Run single stages on tiny checkpoints, the way the build does, without the CLI."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import Artifact
from pipeline.stages.base import BuildContext, StageResult
from pipeline.stages.export import ExportConfig, ExportStage
from pipeline.stages.load import LoadConfig, LoadStage, checkpoint_artifact


def run_load(
    ctx: BuildContext, folder: Path, out: Path, task: str = "feature-extraction"
) -> tuple[Artifact, StageResult]:
    out.mkdir(parents=True, exist_ok=True)
    result = LoadStage(LoadConfig(task=task, pooling="auto")).run(
        ctx, {"checkpoint": checkpoint_artifact(folder)}, out
    )
    return Artifact.of("info", out / "checkpoint.json"), result


def run_export(
    ctx: BuildContext, folder: Path, info: Artifact, out: Path
) -> tuple[Artifact, StageResult]:
    out.mkdir(parents=True, exist_ok=True)
    result = ExportStage(ExportConfig(opset=20)).run(
        ctx, {"checkpoint": checkpoint_artifact(folder), "info": info}, out
    )
    return Artifact.of("model", out / "model"), result


def run_reference(
    ctx: BuildContext,
    folder: Path,
    info: Artifact,
    out: Path,
    padding: tuple[str, ...] = ("right",),
) -> Artifact:
    """PyTorch's outputs on the shipped evaluation set (first 32 texts), as the build records them."""
    from pipeline.calibration import shipped_data
    from pipeline.stages.reference import ReferenceConfig, ReferenceStage

    out.mkdir(parents=True, exist_ok=True)
    config = ReferenceConfig(
        batch_size=8,
        padding=padding,
        max_length=64,
        max_samples=32,
        text_field="text",
        label_field="label",
        threads=1,
    )
    ReferenceStage(config).run(
        ctx,
        {
            "checkpoint": checkpoint_artifact(folder),
            "info": info,
            "evaluation": Artifact.of("evaluation", shipped_data("evaluation")),
        },
        out,
    )
    return Artifact.of("reference", out / "reference")
