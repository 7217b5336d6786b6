"""Fixtures the stage tests share: a tiny BERT fused the INT8 way, with its reference."""

from pathlib import Path

import pytest

from pipeline.artifacts import Artifact
from pipeline.stages.base import BuildContext
from pipeline.stages.optimize import OptimizeConfig, OptimizeStage
from tests.stages.helpers import run_export, run_load, run_reference


@pytest.fixture(scope="session")
def bert_parts(checkpoint, tmp_path_factory) -> dict[str, Artifact]:
    """A tiny BERT fused the INT8 way (mha, ffn), its info and its PyTorch reference."""
    tmp = tmp_path_factory.mktemp("fused")
    ctx = BuildContext()
    folder = checkpoint("bert")
    info, _ = run_load(ctx, folder, tmp / "load")
    model, _ = run_export(ctx, folder, info, tmp / "export")
    (tmp / "optimize").mkdir()
    OptimizeStage(OptimizeConfig(profile="ort", fusions=("ffn", "mha"))).run(
        ctx, {"model": model, "info": info}, tmp / "optimize"
    )
    reference = run_reference(ctx, folder, info, tmp / "reference")
    return {
        "model": Artifact.of("model", tmp / "optimize" / "model"),
        "info": info,
        "reference": reference,
        "export": model,
    }


@pytest.fixture(scope="session")
def fused_bert(bert_parts) -> Path:
    return bert_parts["model"].path
