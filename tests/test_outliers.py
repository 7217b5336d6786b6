"""Outlier input channels multiplied in float beside dynamic INT8, and inputs smoothed
(pipeline.outliers)."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from pipeline.outliers import (
    MARKER,
    OutlierSettings,
    channel_ranges,
    choose_channels,
    plan_channels,
    ranges_from_json,
    ranges_to_json,
    smooth_inputs,
    smoothing_scales,
    split_channels,
    split_outliers,
    standout,
    weight_matmul_inputs,
)

K, N = 64, 48
#: Input channels made large on purpose, and by how much.
LOUD = {5: 40.0, 17: 12.0}


def _graph(seed: int = 0) -> onnx.ModelProto:
    """x -> LayerNormalization -> two MatMuls sharing their input (like Q and K), and a third
    MatMul on the first one's output."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(K, dtype=np.float32)
    for channel, factor in LOUD.items():
        gamma[channel] = factor
    weights = {
        "w_a": rng.normal(0, 0.1, (K, N)).astype(np.float32),
        "w_b": rng.normal(0, 0.1, (K, N)).astype(np.float32),
        "w_c": rng.normal(0, 0.1, (N, K)).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h", "w_a"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["h", "w_b"], ["b"], name="mm_b"),
        helper.make_node("Add", ["a", "b"], ["ab"], name="add"),
        helper.make_node("MatMul", ["ab", "w_c"], ["y"], name="mm_c"),
    ]
    inits = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(np.zeros(K, dtype=np.float32), "beta"),
        *(numpy_helper.from_array(v, k) for k, v in weights.items()),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", K])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _feeds(count: int = 3, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (2, 7, K)).astype(np.float32)} for _ in range(count)]


def _run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(["y"], feed)[0]


def _dynamic_int8(source: Path, target: Path, nodes_to_exclude: list[str] | None = None) -> None:
    """ONNX Runtime's dynamic INT8 as the quantize stage calls it: MatMuls, weights per channel."""
    quantize_dynamic(
        source,
        target,
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=nodes_to_exclude or [],
    )


def test_ranges_are_the_per_channel_maxima_of_each_weights_input(tmp_path: Path) -> None:
    model = _graph()
    onnx.save(model, str(tmp_path / "model.onnx"))
    feeds = _feeds()
    ranges = channel_ranges(tmp_path / "model.onnx", feeds)
    assert set(ranges) == {"w_a", "w_b", "w_c"}
    assert weight_matmul_inputs(model) == {"w_a": ["h"], "w_b": ["h"], "w_c": ["ab"]}
    # The same maxima computed by hand from the LayerNorm output.
    expected = np.zeros(K, dtype=np.float32)
    for feed in feeds:
        x = feed["x"]
        h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        gamma = numpy_helper.to_array(model.graph.initializer[0])
        expected = np.maximum(expected, np.abs(h * gamma).reshape(-1, K).max(0))
    np.testing.assert_allclose(ranges["w_a"], expected, rtol=1e-4)
    np.testing.assert_array_equal(ranges["w_a"], ranges["w_b"])
    assert ranges["w_c"].shape == (N,)
    # Stored as JSON and read back, the same values (float32) and the same bytes twice.
    text = ranges_to_json(ranges)
    assert text == ranges_to_json(ranges_from_json(text))
    np.testing.assert_array_equal(ranges_from_json(text)["w_a"], ranges["w_a"])


def test_the_loud_channels_are_chosen_largest_first_up_to_the_limit() -> None:
    top = np.ones(K, dtype=np.float32)
    top[5], top[17], top[30] = 40.0, 12.0, 2.0
    assert choose_channels({"w": top}, OutlierSettings(threshold=3.0, max_channels=8)) == {
        "w": [5, 17]
    }
    # At most one: the largest.
    assert choose_channels({"w": top}, OutlierSettings(threshold=3.0, max_channels=1)) == {"w": [5]}
    # A higher threshold leaves the 12x channel; nothing stands out 50x: the weight is left out.
    assert choose_channels({"w": top}, OutlierSettings(threshold=20.0)) == {"w": [5]}
    assert choose_channels({"w": top}, OutlierSettings(threshold=50.0)) == {}
    assert standout(top) == 40.0
    # An input whose median channel is all zeros stands out by nothing (no division by zero).
    silent = np.zeros(K, dtype=np.float32)
    silent[0] = 5.0
    assert standout(silent) == 0.0 and choose_channels({"w": silent}, OutlierSettings()) == {}


def test_the_split_graph_computes_what_the_original_does_in_float(tmp_path: Path) -> None:
    model = _graph()
    onnx.save(model, str(tmp_path / "model.onnx"))
    ranges = channel_ranges(tmp_path / "model.onnx", _feeds())
    chosen = choose_channels(ranges, OutlierSettings())
    assert chosen["w_a"] == chosen["w_b"] == sorted(LOUD)
    split = _graph()
    added = split_outliers(split, chosen)
    onnx.checker.check_model(split)
    assert sorted(added) == sorted(f"mm_{n}{MARKER}" for n in "abc" if f"w_{n}" in chosen)
    ops = [n.op_type for n in split.graph.node]
    # One mask and one Gather for the input Q and K share.
    shared = [n for n in split.graph.node if n.op_type == "Gather" and n.input[0] == "h"]
    assert len(shared) == 1 and ops.count("MatMul") == 3 + len(added)
    for feed in _feeds(2, seed=7):
        np.testing.assert_allclose(_run(split, feed), _run(model, feed), rtol=1e-5, atol=1e-5)
    # The main product's weight rows for the split channels are zero.
    weights = {i.name: numpy_helper.to_array(i) for i in split.graph.initializer}
    assert not weights["w_a"][sorted(LOUD)].any()
    np.testing.assert_array_equal(
        weights[f"mm_a{MARKER}.weight"], numpy_helper.to_array(model.graph.initializer[2])[[5, 17]]
    )


def test_dynamic_int8_of_the_split_graph_is_closer_to_float(tmp_path: Path) -> None:
    model = _graph()
    onnx.save(model, str(tmp_path / "model.onnx"))
    chosen = choose_channels(channel_ranges(tmp_path / "model.onnx", _feeds()), OutlierSettings())
    split = _graph()
    added = split_outliers(split, chosen)
    onnx.save(split, str(tmp_path / "split.onnx"))
    _dynamic_int8(tmp_path / "model.onnx", tmp_path / "plain.onnx")
    _dynamic_int8(tmp_path / "split.onnx", tmp_path / "int8.onnx", nodes_to_exclude=added)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    # The three main products are INT8; the narrow outlier products stayed float.
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == 3
    assert ops.count("MatMul") == len(added)
    feed = _feeds(1, seed=11)[0]
    reference = _run(model, feed)
    plain = np.abs(_run(tmp_path / "plain.onnx", feed) - reference).mean()
    split_error = np.abs(_run(tmp_path / "int8.onnx", feed) - reference).mean()
    # A 40x channel leaves the others a tenth of the levels: the split gets them back (the
    # error left is mostly the last MatMul's own, whose input has no outlier).
    assert split_error < plain / 2


def test_matmuls_sharing_an_input_may_split_different_channels() -> None:
    model = _graph()
    split = _graph()
    split_outliers(split, {"w_a": [5], "w_b": [5, 17]})
    assert sum(n.op_type == "Gather" for n in split.graph.node) == 2
    assert split_channels(model, {"w_a": [5], "w_b": [5, 17]}) == (1, 2)
    for feed in _feeds(2):
        np.testing.assert_allclose(_run(split, feed), _run(model, feed), rtol=1e-5, atol=1e-5)


def _shared_weight_graph() -> onnx.ModelProto:
    """Two MatMuls with one weight (layers sharing their weights, as ALBERT's do), the first
    on a graph input directly."""
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.1, (K, K)).astype(np.float32)
    scale = np.ones(K, dtype=np.float32)
    scale[9] = 30.0
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h1"], name="layer0"),
        helper.make_node("Mul", ["h1", "scale"], ["h1s"], name="loud"),
        helper.make_node("MatMul", ["h1s", "w"], ["y"], name="layer1"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", K])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_weight_shared_by_two_matmuls_is_split_for_both(tmp_path: Path) -> None:
    model = _shared_weight_graph()
    onnx.save(model, str(tmp_path / "model.onnx"))
    assert weight_matmul_inputs(model) == {"w": ["x", "h1s"]}
    feeds = _feeds()
    ranges = channel_ranges(tmp_path / "model.onnx", feeds)
    # The range covers both inputs: the graph input's and the loud second layer's.
    loud = np.max([np.abs(_run_h1s(model, f)).reshape(-1, K).max(0) for f in feeds], axis=0)
    direct = np.max([np.abs(f["x"]).reshape(-1, K).max(0) for f in feeds], axis=0)
    np.testing.assert_allclose(ranges["w"], np.maximum(loud, direct), rtol=1e-5)
    chosen = choose_channels(ranges, OutlierSettings())
    assert chosen == {"w": [9]}
    split = _shared_weight_graph()
    added = split_outliers(split, chosen)
    assert sorted(added) == [f"layer0{MARKER}", f"layer1{MARKER}"]
    weights = {i.name: numpy_helper.to_array(i) for i in split.graph.initializer}
    original = numpy_helper.to_array(model.graph.initializer[0])
    # Both get the real rows, not the zeroed ones.
    for name in added:
        np.testing.assert_array_equal(weights[f"{name}.weight"], original[[9]])
    for feed in _feeds(2, seed=5):
        np.testing.assert_allclose(_run(split, feed), _run(model, feed), rtol=1e-4, atol=1e-5)


def _run_h1s(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_empty_tensor_value_info("h1s"))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["h1s"], feed)[0]


def test_smoothing_keeps_the_product_and_flattens_the_input(tmp_path: Path) -> None:
    model = _graph()
    onnx.save(model, str(tmp_path / "model.onnx"))
    ranges = channel_ranges(tmp_path / "model.onnx", _feeds())
    scales = smoothing_scales(model, ranges, alpha=0.75)
    # Q and K (w_a, w_b) read one input: one scale for both, from both weights' rows.
    np.testing.assert_array_equal(scales["w_a"], scales["w_b"])
    assert set(scales) == {"w_a", "w_b", "w_c"}
    smoothed = _graph()
    assert smooth_inputs(smoothed, scales) == (2, 3)
    onnx.checker.check_model(smoothed)
    muls = [n for n in smoothed.graph.node if n.op_type == "Mul"]
    assert [n.input[0] for n in muls] == ["h", "ab"]
    for feed in _feeds(2, seed=7):
        np.testing.assert_allclose(_run(smoothed, feed), _run(model, feed), rtol=1e-4, atol=1e-5)
    # The weight rows carry the scales; the inputs the MatMuls now see stand out far less.
    weights = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    original = numpy_helper.to_array(model.graph.initializer[2])
    np.testing.assert_allclose(weights["w_a"], original * scales["w_a"][:, None], rtol=1e-6)
    onnx.save(smoothed, str(tmp_path / "smoothed.onnx"))
    flat = channel_ranges(tmp_path / "smoothed.onnx", _feeds())
    assert standout(ranges["w_a"]) > 30 and standout(flat["w_a"]) < 4


def test_dynamic_int8_of_the_smoothed_graph_is_closer_to_float(tmp_path: Path) -> None:
    model = _graph()
    onnx.save(model, str(tmp_path / "model.onnx"))
    ranges = channel_ranges(tmp_path / "model.onnx", _feeds())
    smoothed = _graph()
    smooth_inputs(smoothed, smoothing_scales(model, ranges, alpha=0.75))
    onnx.save(smoothed, str(tmp_path / "smoothed.onnx"))
    _dynamic_int8(tmp_path / "model.onnx", tmp_path / "plain.onnx")
    _dynamic_int8(tmp_path / "smoothed.onnx", tmp_path / "int8.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    # Every product INT8 (the smoothing Muls stay float, before the quantizer's).
    assert ops.count("MatMul") == 0 and ops.count("MatMulInteger") == 3
    feed = _feeds(1, seed=11)[0]
    reference = _run(model, feed)
    plain = np.abs(_run(tmp_path / "plain.onnx", feed) - reference).mean()
    smoothed_error = np.abs(_run(tmp_path / "int8.onnx", feed) - reference).mean()
    # Measured: 0.37 of the plain error.
    assert smoothed_error < plain / 2


def test_a_weight_shared_by_two_matmuls_gets_one_scale_for_both_inputs(tmp_path: Path) -> None:
    model = _shared_weight_graph()
    onnx.save(model, str(tmp_path / "model.onnx"))
    ranges = channel_ranges(tmp_path / "model.onnx", _feeds())
    scales = smoothing_scales(model, ranges, alpha=0.5)
    smoothed = _shared_weight_graph()
    # One weight, scaled once; each of its two inputs divided by the same scales.
    assert smooth_inputs(smoothed, scales) == (2, 2)
    inverse = [
        numpy_helper.to_array(i) for i in smoothed.graph.initializer if i.name.endswith(".scale")
    ]
    assert len(inverse) == 2
    np.testing.assert_array_equal(inverse[0], inverse[1])
    for feed in _feeds(2, seed=5):
        np.testing.assert_allclose(_run(smoothed, feed), _run(model, feed), rtol=1e-4, atol=1e-4)


def test_inputs_smoothing_cannot_flatten_are_split_instead() -> None:
    model = _graph()
    top_h = np.ones(K, dtype=np.float32)
    top_h[5] = 40.0  # smoothed at alpha 0.75: about 40 ** 0.25 = 2.5x, under 3x
    top_ab = np.ones(N, dtype=np.float32)
    top_ab[3] = 1e4  # about 10x after smoothing: still over
    ranges = {"w_a": top_h, "w_b": top_h, "w_c": top_ab}
    settings = OutlierSettings(threshold=3.0)
    chosen, scales = plan_channels(model, ranges, settings, 0.75)
    assert chosen == {"w_c": [3]} and set(scales) == {"w_a", "w_b"}
    # Outliers alone: every loud input split; smoothing alone: every input smoothed.
    assert plan_channels(model, ranges, settings, None) == (
        {"w_a": [5], "w_b": [5], "w_c": [3]},
        {},
    )
    alone, every = plan_channels(model, ranges, None, 0.75)
    assert alone == {} and set(every) == {"w_a", "w_b", "w_c"}
    # A weight kept in float gets neither; its group's other weights are still smoothed.
    chosen, scales = plan_channels(model, ranges, settings, 0.75, excluded={"w_a", "w_c"})
    assert chosen == {} and set(scales) == {"w_b"}


def test_a_weight_another_node_also_reads_is_neither_smoothed_nor_split(tmp_path: Path) -> None:
    """w_c also feeds a Gather (as a tied embedding table would): its rows stay as they are,
    while Q and K are still smoothed."""
    model = _graph()
    model.graph.node.append(helper.make_node("Gather", ["w_c", "idx"], ["rows"], name="lookup"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 3], np.int64), "idx"))
    model.graph.output.append(helper.make_empty_tensor_value_info("rows"))
    ranges = {w: np.ones(n, dtype=np.float32) * 2 for w, n in (("w_a", K), ("w_b", K), ("w_c", N))}
    assert set(smoothing_scales(model, ranges, alpha=0.75)) == {"w_a", "w_b"}
    # Nor split: its rows would be zeroed.
    ranges["w_c"][3] = 100.0
    chosen, _ = plan_channels(model, ranges, OutlierSettings(), None)
    assert chosen == {}
