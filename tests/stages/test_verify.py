import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline.build import BuildOptions, build
from pipeline.stages.export import MODEL_FILE
from pipeline.stages.reference import ReferenceData


def test_fp32_variant_matches_pytorch_on_both_padding_sides(
    checkpoint, recipe_for, shared_artifacts: Path
) -> None:
    outcome = build(
        recipe_for(checkpoint("bert"), latency={"enabled": False}),
        BuildOptions(artifacts=shared_artifacts),
    )
    stats = outcome.manifest.stage("verify[fp32]").stats
    assert set(stats["per_side"]) == {"right", "left"}
    for side in stats["per_side"].values():
        assert side["max_abs_error"] < 1e-4
        assert side["mean_cosine"] > 0.99999
        assert side["agreement"] == 1.0
    assert stats["samples"] == 24
    assert all(outcome.manifest.checks)
    # The per-text error distribution (cosine distance): 21 sorted percentiles, whose 100th is
    # the worst text of its side, i.e. 1 - that side's worst cosine.
    assert stats["error_kind"] == "cosine_distance"
    quantiles = stats["error_quantiles"]
    assert len(quantiles) == 21 and quantiles == sorted(quantiles)
    sides = {name: side["error_quantiles"] for name, side in stats["per_side"].items()}
    assert quantiles in sides.values()
    for name, side in stats["per_side"].items():
        assert sides[name][-1] == pytest.approx(1 - side["worst_cosine"], abs=1e-15)


def test_left_padding_really_moves_the_tokens(
    checkpoint, recipe_for, shared_artifacts: Path
) -> None:
    outcome = build(
        recipe_for(checkpoint("bert"), latency={"enabled": False}),
        BuildOptions(artifacts=shared_artifacts),
    )
    record = outcome.manifest.stage("reference")
    from pipeline.artifacts import ArtifactStore

    ref = ReferenceData(ArtifactStore(shared_artifacts).output_path(record, "reference"))
    right = next(ref.batches("right"))
    left = next(ref.batches("left"))
    assert right.mask[:, 0].all() and not right.mask[:, -1].all()
    assert left.mask[:, -1].all() and not left.mask[:, 0].all()
    assert (right.mask.sum(1) == left.mask.sum(1)).all()


def _damage(model_dir: Path, target: Path) -> Path:
    """A copy of the exported graph with one LayerNorm scale doubled: a broken compile."""
    target.mkdir()
    for file in model_dir.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    model = onnx.load(str(target / MODEL_FILE))
    norm = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    init = next(i for i in model.graph.initializer if i.name == norm.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2.0, init.name))
    onnx.save(model, str(target / MODEL_FILE))
    return target


def test_a_damaged_graph_fails_the_parity_check(
    checkpoint, recipe_for, shared_artifacts: Path, tmp_path: Path
) -> None:
    from pipeline.artifacts import Artifact, ArtifactStore
    from pipeline.report.checks import tolerance_checks
    from pipeline.stages.base import BuildContext
    from pipeline.stages.verify import VerifyConfig, VerifyStage

    recipe = recipe_for(checkpoint("bert"), latency={"enabled": False})
    outcome = build(recipe, BuildOptions(artifacts=shared_artifacts))
    store = ArtifactStore(shared_artifacts)
    broken = _damage(
        store.output_path(outcome.manifest.stage("export"), "model"), tmp_path / "broken"
    )
    reference = Artifact.of(
        "reference", store.output_path(outcome.manifest.stage("reference"), "reference")
    )
    stage = VerifyStage(
        VerifyConfig(
            variant="fp32",
            target="ort-cpu",
            precision="fp32",
            session_optimization="all",
            threads=1,
        )
    )
    stats = stage.run(
        BuildContext(), {"model": Artifact.of("model", broken), "reference": reference}, tmp_path
    ).stats
    assert stats["max_abs_error"] > 0.1
    # The damage shows in the distribution: the median text is far off, not just one outlier.
    intact = outcome.manifest.stage("verify[fp32]").stats["error_quantiles"]
    assert stats["error_quantiles"][10] > 1000 * max(intact[10], 1e-12)
    stages = [
        s.model_copy(update={"stats": stats}) if s.step == "verify[fp32]" else s
        for s in outcome.manifest.stages
    ]
    failed = [c for c in tolerance_checks(recipe, stages) if not c]
    assert next(c.metric for c in failed) == "max_abs_error"
    assert "would pass with <=" in str(failed[0])


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_classification_tasks_with_labels(
    checkpoint, recipe_for, shared_artifacts: Path, tmp_path: Path, task: str
) -> None:
    texts = [
        json.loads(line)["text"]
        for line in (Path(__file__).parents[2] / "calibration" / "evaluation.jsonl")
        .read_text()
        .splitlines()[:20]
    ]
    rows = []
    for i, text in enumerate(texts):
        label = (
            [f"L{(i + j) % 3}" for j in range(len(text.split()))]
            if task == "token-classification"
            else f"L{i % 3}"
        )
        rows.append(json.dumps({"text": text, "label": label}))
    data = tmp_path / "labelled.jsonl"
    data.write_text("\n".join(rows) + "\n")
    recipe = recipe_for(
        checkpoint("bert", task),
        task=task,
        data={"evaluation": str(data)},
        latency={"enabled": False},
    )
    outcome = build(recipe, BuildOptions(artifacts=shared_artifacts))
    stats = outcome.manifest.stage("verify[fp32]").stats
    assert stats["agreement"] == 1.0
    assert stats["max_abs_error"] < 1e-4
    # Same predictions, so the same task metric for PyTorch and the variant.
    assert stats["task_metric"] == stats["reference_task_metric"]
    assert stats["task_metric_drop"] == 0.0
    assert 0.0 <= stats["task_metric"] <= 1.0
    assert "mean_cosine" not in stats
    report = outcome.report
    assert report.contenders[0].task_metric == stats["reference_task_metric"]


def test_labels_on_some_samples_only_is_an_error(
    checkpoint, recipe_for, shared_artifacts: Path, tmp_path: Path
) -> None:
    from pipeline.errors import InputError

    data = tmp_path / "partial.jsonl"
    data.write_text('{"text": "a b c", "label": "L0"}\n{"text": "d e"}\n')
    recipe = recipe_for(
        checkpoint("bert", "sequence-classification"),
        task="sequence-classification",
        data={"evaluation": str(data)},
        latency={"enabled": False},
    )
    with pytest.raises(InputError, match="1 of 2 samples have a label"):
        build(recipe, BuildOptions(artifacts=shared_artifacts))


def test_reference_arrays_are_the_fed_inputs(
    checkpoint, recipe_for, shared_artifacts: Path
) -> None:
    outcome = build(
        recipe_for(checkpoint("distilbert"), latency={"enabled": False}),
        BuildOptions(artifacts=shared_artifacts),
    )
    from pipeline.artifacts import ArtifactStore

    ref = ReferenceData(
        ArtifactStore(shared_artifacts).output_path(
            outcome.manifest.stage("reference"), "reference"
        )
    )
    batch = next(ref.batches("right"))
    assert set(batch.feed) == {"input_ids", "attention_mask"}
    assert batch.output.shape[:2] == batch.feed["input_ids"].shape
    assert np.array_equal(batch.mask, batch.feed["attention_mask"])


def test_nan_outputs_fail_the_parity_check(checkpoint, recipe_for, shared_artifacts: Path) -> None:
    """A variant that writes NaN at one real token must fail, not vanish in max()."""
    from pipeline.artifacts import ArtifactStore
    from pipeline.report.checks import tolerance_checks
    from pipeline.stages.verify import compare_to_reference

    recipe = recipe_for(checkpoint("bert"), latency={"enabled": False})
    outcome = build(recipe, BuildOptions(artifacts=shared_artifacts))
    ref = ReferenceData(
        ArtifactStore(shared_artifacts).output_path(
            outcome.manifest.stage("reference"), "reference"
        )
    )
    batches = {b.key: b for side in ref.sides for b in ref.batches(side)}
    poisoned = "left/0001"

    def run(feed: dict) -> np.ndarray:
        key = next(
            k for k, b in batches.items() if np.array_equal(b.feed["input_ids"], feed["input_ids"])
        )
        out = batches[key].output.copy()
        if key == poisoned:
            row, col = np.argwhere(batches[key].mask)[0]
            out[row, col, 0] = np.nan
        return out

    stats = compare_to_reference(ref, run)
    assert stats["nonfinite_outputs"] == 1
    assert stats["max_abs_error"] is None and stats["per_side"]["right"]["max_abs_error"] == 0.0
    stages = [
        s.model_copy(update={"stats": stats}) if s.step == "verify[fp32]" else s
        for s in outcome.manifest.stages
    ]
    failed = {c.metric for c in tolerance_checks(recipe, stages) if not c}
    assert {"nonfinite_outputs", "max_abs_error", "mean_cosine"} <= failed


def test_label_names_win_over_ids_and_ids_are_range_checked(tmp_path: Path) -> None:
    from pipeline.calibration import Sample
    from pipeline.errors import InputError
    from pipeline.stages.load import CheckpointInfo
    from pipeline.stages.reference import _labels

    info = CheckpointInfo(
        task="sequence-classification",
        architecture={},
        inputs=["input_ids"],
        output="logits",
        pooling="none",
        max_length=128,
        num_parameters=1,
        labels={"1": 0, "2": 1, "3": 2},
        num_labels=3,
        missing_head_weights=[],
        tokenizer={"fast": True},
    )
    assert _labels([Sample("a", "2"), Sample("b", 0), Sample("c", "3")], info, tmp_path) == [
        1,
        0,
        2,
    ]
    with pytest.raises(InputError, match="label id 5 is out of range"):
        _labels([Sample("a", 5)], info, tmp_path)
    with pytest.raises(InputError, match="'POSITIVE' is not one of the model's labels"):
        _labels([Sample("a", "POSITIVE")], info, tmp_path)


def test_a_variants_own_tolerance_wins_for_it_alone(
    checkpoint, recipe_for, shared_artifacts: Path
) -> None:
    from pipeline.report.checks import tolerance_checks

    variants = [{"name": "fp32"}, {"name": "strict"}]
    outcome = build(
        recipe_for(checkpoint("bert"), latency={"enabled": False}, variants=variants),
        BuildOptions(artifacts=shared_artifacts),
    )
    error = outcome.manifest.stage("verify[strict]").stats["max_abs_error"]
    assert 0 < error < 1e-4
    held = recipe_for(
        checkpoint("bert"),
        latency={"enabled": False},
        verify={"tolerance": {"min_agreement": 0.5}},
        variants=[{"name": "fp32"}, {"name": "strict", "tolerance": {"max_abs_error": error / 2}}],
    )
    checks = {(c.variant, c.metric): c for c in tolerance_checks(held, outcome.manifest.stages)}
    assert checks["strict", "max_abs_error"].limit == error / 2
    assert not checks["strict", "max_abs_error"].passed
    assert checks["fp32", "max_abs_error"].limit == 1e-4  # the architecture's, for the other
    assert checks["fp32", "max_abs_error"].passed
    assert checks["strict", "agreement"].limit == checks["fp32", "agreement"].limit == 0.5
    assert [key for key, c in checks.items() if not c.passed] == [("strict", "max_abs_error")]


def test_the_task_metric_drop_is_read_on_one_side() -> None:
    """PyTorch scores 1.0 right-padded and 0.8 left-padded; the variant 0.9 and 0.8. Each
    worst side reads 0.8, as if nothing were lost: the drop, taken side by side, is 0.1."""
    from pipeline.stages.verify import worst_side

    def side(variant: float, pytorch: float) -> dict[str, float | int | None]:
        return {
            "max_abs_error": 0.1,
            "nonfinite_outputs": 0,
            "agreement": variant,
            "task_metric": variant,
            "reference_task_metric": pytorch,
            "error_quantiles": None,
        }

    overall = worst_side({"right": side(0.9, 1.0), "left": side(0.8, 0.8)})
    assert overall["task_metric"] == overall["reference_task_metric"] == 0.8
    assert overall["task_metric_drop"] == pytest.approx(0.1)
    # A variant better than PyTorch on every side: a negative drop, the smallest gain.
    assert worst_side({"right": side(0.9, 0.8), "left": side(0.85, 0.8)})[
        "task_metric_drop"
    ] == pytest.approx(-0.05)
