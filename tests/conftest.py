"""Shared fixtures: tiny seeded checkpoints and a session-wide artifact store.

Checkpoints are built once per session; builds share one store, so a stage that several tests
need (say, exporting the tiny BERT) runs once and later tests exercise the cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.artifacts import Artifact
from pipeline.recipe import Recipe, parse_recipe
from pipeline.stages.base import BuildContext
from pipeline.stages.optimize import OptimizeConfig, OptimizeStage
from tests.stages.helpers import run_export, run_load, run_reference
from tests.tiny import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``checkpoint(family, task)``: the folder of a tiny random checkpoint, built once."""
    made: dict[tuple[str, str], Path] = {}

    def get(family: str = "bert", task: str = "feature-extraction") -> Path:
        key = (family, task)
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp(f"{family}-{task}"), family, task)
        return made[key]

    return get


@pytest.fixture(scope="session")
def shared_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


def tiny_recipe(source: Path | str, task: str = "feature-extraction", **sections: Any) -> Recipe:
    """A fast recipe for tiny models: short texts, few timing runs, no memory probe."""
    data: dict[str, Any] = {
        "name": "tiny",
        "model": {"source": str(source), "task": task},
        "shapes": {"batch": [1, 2], "sequence": [16]},
        "data": {"max_samples": 24, "max_length": 32},
        "verify": {"batch_size": 8},
        "latency": {"warmup": 1, "runs": 3, "threads": 1, "memory": False},
    }
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
    return parse_recipe(data, origin="test recipe")


@pytest.fixture
def recipe_for() -> Callable[..., Recipe]:
    return tiny_recipe


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
