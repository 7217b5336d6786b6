"""The encoder floor: PyTorch itself cast to 16 bits, verified against its FP32 record."""

from pathlib import Path

import pytest
import torch

from pipeline.build import BuildOptions, build
from pipeline.recipe import parse_recipe
from pipeline.recipes import encoder_pipeline
from pipeline.stages.base import BuildContext
from pipeline.stages.floor import FloorConfig, FloorStage, floor_precisions
from pipeline.stages.load import loaded_model
from tests.stages.helpers import checkpoint_artifact, run_load, run_reference


@pytest.fixture(scope="module")
def recorded(checkpoint, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("floor")
    ctx = BuildContext()
    folder = checkpoint("bert")
    info, _ = run_load(ctx, folder, tmp / "load")
    reference = run_reference(ctx, folder, info, tmp / "reference", padding=("right", "left"))
    return {"ctx": ctx, "folder": folder, "info": info, "reference": reference, "tmp": tmp}


def _floor(recorded: dict, precisions: tuple[str, ...], device: str = "cpu") -> dict:
    out = recorded["tmp"] / f"floor-{device}-{'-'.join(precisions)}"
    out.mkdir()
    stage = FloorStage(FloorConfig(precisions=precisions, device=device, threads=1))
    inputs = {
        "checkpoint": checkpoint_artifact(recorded["folder"]),
        "info": recorded["info"],
        "reference": recorded["reference"],
    }
    return stage.run(recorded["ctx"], inputs, out).stats


def test_the_floor_measures_pytorch_cast_whole(recorded) -> None:
    stats = _floor(recorded, ("fp32", "fp16", "bf16"))
    assert list(stats) == ["fp32", "fp16", "bf16"]
    # FP32 on the CPU is the recorded run itself: no error at all. A cast that did not
    # happen would give the same zeros for fp16 and bf16.
    assert stats["fp32"]["max_abs_error"] == 0.0 and stats["fp32"]["mean_cosine"] == 1.0
    fp16, bf16 = stats["fp16"], stats["bf16"]
    # bf16 keeps 8 significant bits to fp16's 11: its error is the larger, and both are the
    # size a 16-bit rounding of a random-weight BERT gives, not a broken run's.
    assert 0 < fp16["max_abs_error"] < bf16["max_abs_error"] < 0.5
    assert 0 < fp16["mean_abs_error"] < bf16["mean_abs_error"]
    assert 0.9999 < fp16["mean_cosine"] < 1.0 and 0.99 < bf16["mean_cosine"] < fp16["mean_cosine"]
    for figures in (fp16, bf16):
        assert figures["device"] == "cpu" and figures["samples"] == 32
        assert set(figures["per_side"]) == {"right", "left"}
        assert figures["nonfinite_outputs"] == 0
        assert figures["error_kind"] == "cosine_distance" and len(figures["error_quantiles"]) == 21
    # The cast is a copy: the build's shared model stays float32.
    model = loaded_model(recorded["ctx"], recorded["folder"], "feature-extraction").model
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda)")
def test_the_floor_runs_on_the_gpu(recorded) -> None:
    """On a GPU: PyTorch FP32 there is within float rounding of the CPU record, FP16 is not."""
    stats = _floor(recorded, ("fp32", "fp16"), device="cuda")
    assert stats["fp32"]["device"] == stats["fp16"]["device"] == "cuda"
    assert stats["fp32"]["max_abs_error"] < 1e-4
    assert stats["fp32"]["max_abs_error"] < stats["fp16"]["max_abs_error"] < 0.5


def test_a_gpu_build_runs_the_floor_on_the_gpu_with_fp32_first(checkpoint, recipe_for) -> None:
    assert floor_precisions(["fp16", "bf16"], gpu=False) == ("fp16", "bf16")
    assert floor_precisions(["bf16", "fp16"], gpu=False) == ("fp16", "bf16")  # one key
    assert floor_precisions(["fp16"], gpu=True) == ("fp32", "fp16")
    assert floor_precisions([], gpu=True) == ()
    variants = [{"name": "fp16", "target": "ort-cuda", "precision": "fp16"}]
    steps = {
        s.id: s for s in encoder_pipeline(recipe_for(checkpoint(), variants=variants), 1).steps
    }
    config = steps["floor"].stage.config
    assert config.device == "cuda" and config.precisions == ("fp32", "fp16", "bf16")
    assert steps["floor"].stage.key_facets() == ("versions", "gpu")
    cpu = {s.id: s for s in encoder_pipeline(recipe_for(checkpoint()), 1).steps}["floor"]
    assert cpu.stage.config.device == "cpu" and "gpu" not in cpu.stage.key_facets()
    skipped = encoder_pipeline(recipe_for(checkpoint(), verify={"floor": []}), 1)
    assert "floor" not in [s.id for s in skipped.steps]


def test_verify_floor_is_for_encoders() -> None:
    with pytest.raises(Exception, match="floor lists a precision twice"):
        parse_recipe({"verify": {"floor": ["fp16", "fp16"]}})
    with pytest.raises(Exception, match="verify.floor does not apply to text-generation"):
        parse_recipe({"model": {"task": "text-generation"}, "verify": {"floor": ["bf16"]}})


def test_the_report_shows_the_floor_and_names_a_limit_beyond_it(
    checkpoint, recipe_for, tmp_path: Path
) -> None:
    """An fp16 variant held to an error PyTorch fp16 itself exceeds: the build fails that
    check, and the report says the limit is beyond the floor, not a conversion bug."""
    variants = [
        {"name": "fp16", "precision": "fp16", "tolerance": {"max_abs_error": 1e-7}},
    ]
    outcome = build(
        recipe_for(checkpoint(), variants=variants, latency={"enabled": False}),
        BuildOptions(artifacts=tmp_path, run_id="floor"),
    )
    report = outcome.report
    floor = report.floor
    assert set(floor) == {"fp16", "bf16"} and floor["fp16"]["max_abs_error"] > 1e-7
    failed = [c for c in outcome.manifest.checks if not c.passed]
    assert [(c.variant, c.metric) for c in failed] == [("fp16", "max_abs_error")]
    assert (
        "fp16: tolerance max_abs_error 1e-07 is beyond PyTorch's own in fp16 "
        f"({floor['fp16']['max_abs_error']:.6g}, the floor)"
    ) in " ".join(report.notes)
    markdown = (outcome.run_dir / "report.md").read_text()
    assert "## Floor" in markdown
    assert f"| fp16 | cpu | {floor['fp16']['max_abs_error']:.2e} |" in markdown
    html = (outcome.run_dir / "report.html").read_text()
    assert "<h2>Floor</h2>" in html and "PyTorch fp16 (floor)" in html
