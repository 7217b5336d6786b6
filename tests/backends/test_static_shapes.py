"""Models compiled for fixed input shapes (``static_shapes`` on ort-openvino).

Which shape runs which rows, the padding and the cut-back are tested everywhere on ONNX
Runtime's CPU provider, with the model file's inputs fixed to each shape (the same program
OpenVINO's ``reshape_input`` makes); the OpenVINO sessions and a build with the option run where
the provider is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.backends.onnxruntime_backend import OrtRunner
from pipeline.backends.openvino_backend import provider_options, reshape_input
from pipeline.backends.runners import runner_for
from pipeline.backends.static_shapes import Axes, Chunk, StaticShapeRunner, pad, plan_chunks
from pipeline.build import BuildOptions, build
from pipeline.errors import InputError
from pipeline.stages.export import MODEL_FILE
from tests.backends.test_openvino import needs_openvino

SHAPES = [(1, 16), (4, 16), (4, 32)]


def _feed(rows: int, columns: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids of ``rows`` texts of different lengths, right-padded to ``columns``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 90, (rows, columns)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(rows):
        length = max(3, columns - 3 * row)
        ids[row, length:] = 0
        mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_each_input_runs_on_the_smallest_shape_that_holds_it() -> None:
    assert plan_chunks(SHAPES, 1, 10) == [Chunk(0, 1, (1, 16))]
    assert plan_chunks(SHAPES, 2, 16) == [Chunk(0, 2, (4, 16))]
    assert plan_chunks(SHAPES, 1, 17) == [Chunk(0, 1, (4, 32))]
    # More rows than the largest batch: chunks of it, the last on the smallest that holds it.
    assert plan_chunks(SHAPES, 9, 12) == [
        Chunk(0, 4, (4, 16)),
        Chunk(4, 8, (4, 16)),
        Chunk(8, 9, (1, 16)),
    ]


def test_a_sequence_longer_than_every_shape_is_refused() -> None:
    with pytest.raises(InputError, match="an input of 33 tokens is longer than every") as e:
        plan_chunks(SHAPES, 1, 33)
    assert "b1s16, b4s16, b4s32" in str(e.value) and "shapes.sequence" in str(e.value)


def test_padding_masks_new_columns_and_copies_the_first_row() -> None:
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int64)
    out = pad(mask, (4, 5))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(
        out,
        [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]],
    )


def test_reshape_input_names_every_input_in_order() -> None:
    shapes = {"input_ids": (1, 128), "attention_mask": (1, 128)}
    assert reshape_input(shapes) == "input_ids[1,128],attention_mask[1,128]"
    options = provider_options("int8", threads=2, native_bf16=True, shapes=shapes)
    assert options["reshape_input"] == "input_ids[1,128],attention_mask[1,128]"
    assert "reshape_input" not in provider_options("int8", threads=2, native_bf16=True)
    with pytest.raises(ValueError, match="positive dims"):
        reshape_input({"input_ids": (0, 128)})


def test_axes_come_from_the_model_and_other_inputs_are_refused(fused_bert, tmp_path) -> None:
    axes = Axes.of(fused_bert / MODEL_FILE)
    assert axes.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert (axes.batch, axes.sequence) == ("batch", "sequence")
    assert axes.outputs == {"last_hidden_state": ("batch", "sequence", None)}
    model = onnx.load(str(fused_bert / MODEL_FILE))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 16
    onnx.save(model, str(tmp_path / MODEL_FILE))
    with pytest.raises(InputError, match=r"input_ids has dims \['batch', ''\]"):
        Axes.of(tmp_path / MODEL_FILE)


def _fixed_cpu_runner(source: Path, work: Path):  # type: ignore[no-untyped-def]
    """``make`` for a StaticShapeRunner on ONNX Runtime's CPU provider: the model file with its
    inputs fixed to the shape asked for, and the sessions made, by shape."""
    made: list[tuple[int, int]] = []

    def make(shapes: dict[str, tuple[int, int]]) -> OrtRunner:
        model = onnx.load(str(source))
        for value in model.graph.input:
            shape = shapes[value.name]
            for dim, size in zip(value.type.tensor_type.shape.dim, shape, strict=True):
                dim.dim_value = size
        shape = next(iter(shapes.values()))
        made.append(shape)
        path = work / f"b{shape[0]}s{shape[1]}.onnx"
        onnx.save(model, str(path))
        return OrtRunner(path, 1, "basic")

    return make, made


def test_padded_inputs_give_the_dynamic_models_outputs(fused_bert, tmp_path) -> None:
    source = fused_bert / MODEL_FILE
    make, made = _fixed_cpu_runner(source, tmp_path)
    runner = StaticShapeRunner(source, SHAPES, make, name="fixed")
    dynamic = OrtRunner(source, 1, "basic")
    for rows, columns in ((1, 9), (3, 16), (6, 20)):
        feed = _feed(rows, columns, seed=rows)
        got = runner.run(feed)["last_hidden_state"]
        want = dynamic.run(feed)["last_hidden_state"]
        assert got.shape == want.shape == (rows, columns, 32)
        real = feed["attention_mask"].astype(bool)
        assert np.abs(got - want)[real].max() < 1e-5
    # Sessions are made for the shapes used, once each: (6, 20) ran as 4 + 2 rows on b4s32.
    assert made == [(1, 16), (4, 16), (4, 32)]
    assert runner.path == source and runner.output_names == ["last_hidden_state"]
    with pytest.raises(KeyError, match=r"needs inputs \['token_type_ids'\]"):
        runner.prepare({k: v for k, v in _feed(1, 9).items() if k != "token_type_ids"})


def test_timing_calls_run_the_padded_feed_prepared_once(fused_bert, tmp_path) -> None:
    source = fused_bert / MODEL_FILE
    make, made = _fixed_cpu_runner(source, tmp_path)
    runner = StaticShapeRunner(source, [(2, 16)], make)
    feed = _feed(2, 12)
    prepared = runner.prepare(feed)
    results = runner.call(prepared)
    # The call ran the padded feed; its outputs are read (and cut back) after the timing.
    assert len(results) == 1
    assert runner.session((2, 16)).fetch(results[0])[0].shape == (2, 16, 32)
    got = runner.outputs(prepared, runner.call(prepared))["last_hidden_state"]
    want = OrtRunner(source, 1, "basic").run(feed)["last_hidden_state"]
    real = feed["attention_mask"].astype(bool)
    assert got.shape == (2, 12, 32) and np.abs(got - want)[real].max() < 1e-5
    assert made == [(2, 16)]


def test_static_shapes_are_refused_off_openvino(fused_bert) -> None:
    with pytest.raises(ValueError, match="ort-openvino setting, not ort-cpu's"):
        runner_for("ort-cpu", fused_bert, 1, "basic", "x", shapes=[(1, 16)])


@needs_openvino
def test_openvino_compiled_for_fixed_shapes_matches_dynamic_axes(fused_bert) -> None:
    fixed = runner_for("ort-openvino", fused_bert, 1, "basic", "x", "fp32", [(1, 16), (4, 16)])
    dynamic = runner_for("ort-openvino", fused_bert, 1, "basic", "x", "fp32")
    feed = _feed(3, 12)
    got = fixed.run(feed)["last_hidden_state"]
    real = feed["attention_mask"].astype(bool)
    assert np.abs(got - dynamic.run(feed)["last_hidden_state"])[real].max() < 1e-4
    # The b4s16 session was compiled for that shape: OpenVINO takes nothing else.
    assert list(fixed._sessions) == [(4, 16)]
    with pytest.raises(Exception, match=r"model input \(shape=\[4,16\]\)"):
        fixed.session((4, 16)).session.run(None, _feed(4, 12))


@needs_openvino
def test_a_static_shapes_variant_builds_and_says_so(checkpoint, recipe_for, tmp_path) -> None:
    recipe = recipe_for(
        checkpoint("bert"),
        variants=[
            {"name": "ov", "target": "ort-openvino", "precision": "fp32", "static_shapes": True}
        ],
        shapes={"sequence": [16, 32]},
        latency={"memory": True},
    )
    outcome = build(recipe, BuildOptions(artifacts=tmp_path))
    assert outcome.passed, [str(c) for c in outcome.manifest.checks if not c.passed]
    stages = {s.step: s for s in outcome.manifest.stages}
    shapes = [list(s) for s in recipe.shapes.pairs()]
    assert stages["verify[ov]"].config["shapes"] == shapes
    assert stages["verify[ov]"].stats["max_abs_error"] < 1e-4
    latency = stages["latency"].stats
    for key in recipe.timed_shapes():
        assert latency["contenders"]["ov"][key]["p50_ms"] > 0
    assert latency["peak_rss_bytes"]["ov"] > 10 * 2**20
    report = (outcome.run_dir / "report.md").read_text()
    assert f"ov: compiled for fixed input shapes {', '.join(recipe.timed_shapes())}" in report


def test_the_plan_gives_the_shapes_to_every_stage_that_runs_the_variant(
    recipe_for, checkpoint
) -> None:
    from pipeline.recipes import encoder_pipeline

    recipe = recipe_for(
        checkpoint("bert"),
        shapes={"sequence": [32]},
        variants=[
            {"name": "cpu"},
            {
                "name": "ov8",
                "target": "ort-openvino",
                "precision": "int8",
                "static_shapes": True,
                "quantize": {"method": "static", "budget": {"min_mean_cosine": 0.9}},
            },
        ],
    )
    steps = {s.id: s.stage for s in encoder_pipeline(recipe, threads=1).steps}
    shapes = ((1, 32), (2, 32))
    assert steps["verify[ov8]"].config.shapes == shapes  # type: ignore[attr-defined]
    assert steps["quantize[ov8]"].config.shapes == shapes  # type: ignore[attr-defined]
    assert steps["latency"].config.static_shapes == {"ov8": shapes}  # type: ignore[attr-defined]
    # Variants with dynamic axes keep the keys they had before the option.
    assert "shapes" not in steps["verify[cpu]"].key_config()
    assert steps["verify[ov8]"].key_config()["shapes"] == [[1, 32], [2, 32]]
