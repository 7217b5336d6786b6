import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import Artifact
from pipeline.calibration import shipped_data
from pipeline.calibration.table import CalibrationTable, tensorrt_version_number
from pipeline.errors import InputError, PreconditionError
from pipeline.stages.base import BuildContext
from pipeline.stages.calibrate import TABLE, TENSORRT_CACHE, CalibrateConfig, CalibrateStage
from pipeline.stages.export import MODEL_FILE


def calibrate(parts, out: Path, data: Path | None = None, **config) -> tuple[Path, dict]:  # type: ignore[no-untyped-def]
    out.mkdir()
    inputs = {
        "model": parts["model"],
        "info": parts["info"],
        "calibration": Artifact.of("calibration", data or shipped_data("calibration")),
    }
    settings = {"samples": 32, "max_length": 64, **config}
    result = CalibrateStage(CalibrateConfig(**settings)).run(BuildContext(), inputs, out)
    return out / "calibration", result.stats


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_each_method_gives_a_range_for_every_matmul_tensor(bert_parts, tmp_path, method) -> None:
    folder, stats = calibrate(bert_parts, tmp_path / "c", method=method)
    table = CalibrationTable.read(folder / TABLE)
    assert table.method == method and stats["samples"] == 32 and stats["batches"] == 4
    # Inputs and outputs of 12 MatMuls; Q, K and V share their input: 4 inputs + 12 outputs
    # per layer... counted from the graph rather than assumed.
    import onnx

    graph = onnx.load(str(bert_parts["model"].path / MODEL_FILE), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    tensors = {
        name
        for node in graph.node
        if node.op_type == "MatMul"
        for name in (*node.input, *node.output)
        if name not in weights
    }
    assert set(table.ranges) == tensors
    for low, high in table.ranges.values():
        assert np.isfinite(low) and np.isfinite(high) and low <= high
    assert stats["tensors"] == len(tensors)


def test_percentile_ranges_sit_inside_minmax(bert_parts, tmp_path) -> None:
    minmax = CalibrationTable.read(calibrate(bert_parts, tmp_path / "a")[0] / TABLE)
    folder, _ = calibrate(bert_parts, tmp_path / "b", method="percentile", percentile=99.0)
    percentile = CalibrationTable.read(folder / TABLE)
    for name, (low, high) in percentile.ranges.items():
        assert low >= minmax.ranges[name][0] - 1e-6 and high <= minmax.ranges[name][1] + 1e-6
    assert any(
        percentile.ranges[n][1] < 0.9 * minmax.ranges[n][1] for n in minmax.ranges
    )  # the tails are really cut


def test_same_data_and_seed_give_byte_identical_tables(bert_parts, tmp_path) -> None:
    first, _ = calibrate(bert_parts, tmp_path / "a", method="entropy", seed=7)
    second, _ = calibrate(bert_parts, tmp_path / "b", method="entropy", seed=7)
    assert (first / TABLE).read_bytes() == (second / TABLE).read_bytes()
    assert (first / TENSORRT_CACHE).read_bytes() == (second / TENSORRT_CACHE).read_bytes()
    other, _ = calibrate(bert_parts, tmp_path / "c", method="entropy", seed=8)
    assert (other / TABLE).read_bytes() != (first / TABLE).read_bytes()


def test_tensorrt_cache_holds_the_symmetric_scales(bert_parts, tmp_path) -> None:
    folder, _ = calibrate(bert_parts, tmp_path / "c", symmetric=True)
    table = CalibrationTable.read(folder / TABLE)
    lines = (folder / TENSORRT_CACHE).read_text().splitlines()
    assert lines[0] == "TRT-101300-EntropyCalibration2"
    scales = {}
    for line in lines[1:]:
        name, _, hexed = line.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(hexed))[0]
    assert set(scales) == set(table.ranges)
    for name, (low, high) in table.ranges.items():
        assert scales[name] == pytest.approx(max(abs(low), abs(high)) / 127, rel=1e-6)
        assert low == pytest.approx(-high)  # symmetric ranges


def test_tensorrt_version_numbers() -> None:
    assert tensorrt_version_number("8.6.1") == 8601
    assert tensorrt_version_number("10.13.0") == 101300
    assert tensorrt_version_number("10.0") == 100000


def test_long_samples_are_cut_and_counted(bert_parts, tmp_path) -> None:
    data = tmp_path / "long.txt"
    data.write_text("".join(("word " * (40 + i)).strip() + "\n" for i in range(8)))
    _, stats = calibrate(bert_parts, tmp_path / "c", data=data, samples=8, max_length=16)
    assert stats["truncated"] == 8 and stats["max_length"] == 16
    assert stats["tokens"] == 8 * 16


def test_too_few_samples_is_an_input_error(bert_parts, tmp_path) -> None:
    data = tmp_path / "short.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n')
    with pytest.raises(InputError, match="has 2 samples; 32 are asked for"):
        calibrate(bert_parts, tmp_path / "c", data=data)


def test_a_graph_without_matmuls_is_a_precondition_error(bert_parts, tmp_path) -> None:
    with pytest.raises(PreconditionError, match="no float tensors around"):
        calibrate(bert_parts, tmp_path / "c", op_types=("ConvTranspose",))
