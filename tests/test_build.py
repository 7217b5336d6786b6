import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pipeline.build import BuildOptions, build, describe_plan
from pipeline.manifest import Manifest
from pipeline.report.model import read_report


def test_build_writes_a_complete_run_folder(checkpoint, recipe_for, tmp_path: Path) -> None:
    outcome = build(recipe_for(checkpoint("bert")), BuildOptions(artifacts=tmp_path))
    run = outcome.run_dir
    assert run.parent == tmp_path / "runs"
    assert (tmp_path / "runs" / "latest").resolve() == run
    manifest = Manifest.parse((run / "manifest.json").read_text(), "manifest")
    report = read_report((run / "report.json").read_text(), "report")
    assert report.passed and outcome.passed
    assert [s.step for s in manifest.stages] == [
        "load",
        "export",
        "reference",
        "floor",
        "optimize[fp32]",
        "verify[fp32]",
        "latency",
    ]
    assert {i.name for i in manifest.inputs} == {"checkpoint", "evaluation"}
    assert manifest.environment["versions"]["onnxruntime"] == ort.__version__
    # PyTorch and the variant are both timed at both shapes, with ordered percentiles.
    for contender in report.contenders:
        assert set(contender.latency) == {"b1s16", "b2s16"}
        for lat in contender.latency.values():
            assert 0 < lat.p50_ms <= lat.p90_ms <= lat.p99_ms
    assert report.contenders[1].latency["b1s16"].speedup > 0
    markdown = (run / "report.md").read_text()
    assert "| fp32 (fp32, ort-cpu) |" in markdown and "b2s16 p50 / p90 / p99 ms" in markdown

    # The shipped layout loads with plain onnxruntime and the tokenizer files beside it.
    from transformers import AutoTokenizer

    model_dir = run / "models" / "fp32"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    encoded = tokenizer(["a new list"], return_tensors="np")
    (hidden,) = session.run(
        None, {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()}
    )
    assert hidden.shape == (1, encoded["input_ids"].shape[1], 32)


def test_second_build_is_served_from_the_cache(checkpoint, recipe_for, tmp_path: Path) -> None:
    recipe = recipe_for(checkpoint("bert"))
    first = build(recipe, BuildOptions(artifacts=tmp_path))
    second = build(recipe, BuildOptions(artifacts=tmp_path))
    assert not any(s.cached for s in first.manifest.stages)
    assert all(s.cached for s in second.manifest.stages)
    assert second.report.cached_steps == len(second.manifest.stages)
    assert [s.key for s in first.manifest.stages] == [s.key for s in second.manifest.stages]
    assert first.run_dir != second.run_dir
    remeasured = build(recipe, BuildOptions(artifacts=tmp_path, remeasure=True))
    assert [s.step for s in remeasured.manifest.stages if not s.cached] == ["latency"]
    # The new timings are the ones recorded and stored: a later build is served the re-taken
    # figures, not the first build's.
    old, new = (r.manifest.stage("latency") for r in (first, remeasured))
    assert old is not None and new is not None and old.key == new.key
    assert new.stats["contenders"] != old.stats["contenders"]
    third = build(recipe, BuildOptions(artifacts=tmp_path))
    stored = third.manifest.stage("latency")
    assert stored is not None and stored.cached and stored.stats == new.stats


def test_rebuild_without_cache_gives_the_same_hashes(
    checkpoint, recipe_for, tmp_path: Path
) -> None:
    """Reproducible: same inputs and versions -> same artifacts (timings aside)."""
    recipe = recipe_for(checkpoint("roberta"), latency={"enabled": False})
    first = build(recipe, BuildOptions(artifacts=tmp_path / "a"))
    second = build(recipe, BuildOptions(artifacts=tmp_path / "b", no_cache=True))

    def hashes(manifest: Manifest) -> dict:
        return {
            s.step: (s.key, {n: o.sha256 for n, o in s.outputs.items()}) for s in manifest.stages
        }

    assert hashes(first.manifest) == hashes(second.manifest)
    assert first.manifest.stage("verify[fp32]").stats == second.manifest.stage("verify[fp32]").stats
    assert first.manifest.recipe_sha256 == second.manifest.recipe_sha256


def test_the_recipe_hash_does_not_depend_on_where_the_project_sits(
    checkpoint, recipe_for, tmp_path: Path
) -> None:
    """The same checkpoint and data in another folder (a CI checkout, a laptop): the same
    recipe hash and stage keys; other data: another hash."""
    import shutil

    data = Path(__file__).parents[1] / "calibration" / "evaluation.jsonl"
    hashes = []
    for place in ("ci", "desk"):
        root = tmp_path / place
        shutil.copytree(checkpoint("bert"), root / "model")
        shutil.copy(data, root / "evaluation.jsonl")
        recipe = recipe_for(
            root / "model",
            latency={"enabled": False},
            data={"evaluation": str(root / "evaluation.jsonl"), "max_samples": 8},
        )
        manifest = build(recipe, BuildOptions(artifacts=tmp_path / "a")).manifest
        assert manifest.recipe["model"]["source"] == str(root / "model")
        hashes.append((manifest.recipe_sha256, [s.key for s in manifest.stages]))
    assert hashes[0] == hashes[1]
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(data.read_text().splitlines()[1:]) + "\n")
    recipe = recipe_for(
        tmp_path / "ci" / "model",
        latency={"enabled": False},
        data={"evaluation": str(other), "max_samples": 8},
    )
    assert (
        build(recipe, BuildOptions(artifacts=tmp_path / "a")).manifest.recipe_sha256 != hashes[0][0]
    )


def test_changing_a_gate_reuses_every_stage(checkpoint, recipe_for, tmp_path: Path) -> None:
    build(
        recipe_for(checkpoint("bert"), latency={"enabled": False}), BuildOptions(artifacts=tmp_path)
    )
    strict = recipe_for(
        checkpoint("bert"), latency={"enabled": False}, gates={"max_abs_error": 1e-12}
    )
    outcome = build(strict, BuildOptions(artifacts=tmp_path))
    assert all(s.cached for s in outcome.manifest.stages)
    assert not outcome.passed
    failed = outcome.manifest.failed_checks
    assert [(c.source, c.metric) for c in failed] == [("gate", "max_abs_error")]
    assert json.loads((outcome.run_dir / "report.json").read_text())["passed"] is False


def test_dry_run_plan_reports_cache_state(checkpoint, recipe_for, tmp_path: Path) -> None:
    recipe = recipe_for(checkpoint("bert"), latency={"enabled": False})
    before = describe_plan(recipe, tmp_path)
    assert [r.status for r in before] == ["run"] + ["run (after its inputs)"] * 5
    build(recipe, BuildOptions(artifacts=tmp_path))
    assert [r.status for r in describe_plan(recipe, tmp_path)] == ["cached"] * 6
    assert not list((tmp_path / "runs").glob(".tmp-*"))
    # The plan says what --no-cache and --remeasure would run again.
    assert [r.status for r in describe_plan(recipe, tmp_path, no_cache=True)] == [
        "run (--no-cache)"
    ] * 6
    timed = recipe_for(checkpoint("bert"))
    build(timed, BuildOptions(artifacts=tmp_path))
    plan = {r.step: r.status for r in describe_plan(timed, tmp_path, remeasure=True)}
    assert plan.pop("latency") == "run (--remeasure)" and set(plan.values()) == {"cached"}


def test_no_cache_reruns_a_warm_store(checkpoint, recipe_for, tmp_path: Path) -> None:
    recipe = recipe_for(checkpoint("bert"), latency={"enabled": False})
    first = build(recipe, BuildOptions(artifacts=tmp_path))
    again = build(recipe, BuildOptions(artifacts=tmp_path, no_cache=True))
    assert not any(s.cached for s in again.manifest.stages)
    assert [s.key for s in again.manifest.stages] == [s.key for s in first.manifest.stages]
    assert [s.outputs for s in again.manifest.stages] == [s.outputs for s in first.manifest.stages]


def test_each_setting_reruns_exactly_the_stages_that_read_it(
    checkpoint, recipe_for, tmp_path: Path
) -> None:
    base = recipe_for(checkpoint("bert"))
    build(base, BuildOptions(artifacts=tmp_path))
    changes = {
        "data.max_length": (
            {"data": {"max_length": 24}},
            {"reference", "floor", "verify[fp32]"},
        ),
        "verify.padding": (
            {"verify": {"padding": ["left"]}},
            {"reference", "floor", "verify[fp32]"},
        ),
        "verify.floor": ({"verify": {"floor": ["fp16"]}}, {"floor"}),
        "latency.runs": ({"latency": {"runs": 4}}, {"latency"}),
        "shapes": ({"shapes": {"batch": [1], "sequence": [16]}}, {"latency"}),
        # At `all` the residual Adds are written as Sum (passes.residual_sum): a new graph.
        "variant session level": (
            {"variants": [{"name": "fp32", "session_optimization": "all"}]},
            {"optimize[fp32]", "verify[fp32]", "latency"},
        ),
        "variant session level, no new graph": (
            {"variants": [{"name": "fp32", "session_optimization": "disabled"}]},
            {"verify[fp32]", "latency"},
        ),
        "variant fusions": (
            {"variants": [{"name": "fp32", "fusions": ["attention"]}]},
            {"optimize[fp32]", "verify[fp32]", "latency"},
        ),
        "export.opset": (
            {"export": {"opset": 19}},
            {"export", "optimize[fp32]", "verify[fp32]", "latency"},
        ),
    }
    for label, (sections, expected) in changes.items():
        outcome = build(
            recipe_for(checkpoint("bert"), **sections), BuildOptions(artifacts=tmp_path)
        )
        ran = {s.step for s in outcome.manifest.stages if not s.cached}
        assert ran == expected, label


def test_a_failure_while_writing_the_run_leaves_no_run_folder(
    checkpoint, recipe_for, tmp_path: Path, monkeypatch
) -> None:
    import pipeline.build

    def broken(source: Path, target: Path) -> None:
        (target / "partial").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(pipeline.build, "link_or_copy", broken)
    recipe = recipe_for(checkpoint("bert"), latency={"enabled": False})
    with pytest.raises(OSError, match="disk full"):
        build(recipe, BuildOptions(artifacts=tmp_path, run_id="doomed"))
    runs = tmp_path / "runs"
    assert not (runs / "doomed").exists()
    assert not [p for p in runs.iterdir() if p.name.startswith(".tmp-")]


def test_run_id_is_checked_before_any_work(checkpoint, recipe_for, tmp_path: Path) -> None:

    from pipeline.errors import InputError, RecipeError

    recipe = recipe_for(checkpoint("bert"), latency={"enabled": False})
    with pytest.raises(RecipeError, match="--run-id 'a/b'"):
        build(recipe, BuildOptions(artifacts=tmp_path, run_id="a/b"))
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    with pytest.raises(InputError, match="already exists"):
        build(recipe, BuildOptions(artifacts=tmp_path, run_id="taken"))
    assert not list((tmp_path / "cache").rglob("record.json"))
