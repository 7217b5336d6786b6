"""Cast pairs: a float round trip is removed, a bool's detour through float16 shortened; casts
that change values are left alone. Each graph runs on ONNX Runtime before and after."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from pipeline.passes.remove_cast_pairs import RemoveCastPairs

F32, F16, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64


def two_casts(input_type: int, inner: int, outer: int) -> ir.Model:
    """``y = Cast(Cast(x, to=inner), to=outer)``."""
    from onnx import helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["mid"], to=inner, name="inner"),
            helper.make_node("Cast", ["mid"], ["y"], to=outer, name="outer"),
        ],
        "g",
        [helper.make_tensor_value_info("x", input_type, [3])],
        [helper.make_tensor_value_info("y", outer, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return ir.from_proto(model)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def test_a_float_round_trip_is_removed_and_rounds_no_more() -> None:
    x = np.array([1 / 3, 70000.0, -2.5], dtype=np.float32)
    model = two_casts(F32, F16, F32)
    before = run(model, x)
    result = RemoveCastPairs()(model)
    assert result.stats["cast_pairs_removed"] == 1
    assert [n.op_type for n in result.model.graph] == ["Identity"]
    after = run(result.model, x)
    # float16 rounded 1/3 and overflowed 70000; without the pair the input passes exactly.
    assert before[1] == np.inf and after.tolist() == x.tolist()


def test_a_bool_through_float16_is_cast_once() -> None:
    x = np.array([True, False, True])
    model = two_casts(onnx.TensorProto.BOOL, F16, F32)
    before = run(model, x)
    result = RemoveCastPairs()(model)
    assert result.stats["cast_pairs_removed"] == 1
    nodes = list(result.model.graph)
    assert [n.op_type for n in nodes] == ["Cast"] and nodes[0].attributes["to"].as_int() == F32
    assert run(result.model, x).tolist() == before.tolist() == [1.0, 0.0, 1.0]


def test_casts_that_change_values_are_kept() -> None:
    # float32 -> int64 -> float32 truncates: not a float round trip, so it stays.
    x = np.array([1.7, -2.2, 3.0], dtype=np.float32)
    model = two_casts(F32, I64, F32)
    result = RemoveCastPairs()(model)
    assert result.stats["cast_pairs_removed"] == 0
    assert run(result.model, x).tolist() == [1.0, -2.0, 3.0]


def test_a_bool_through_a_number_to_a_string_is_kept() -> None:
    # bool -> float16 -> string writes "1"; bool -> string would write "true": not the same.
    model = two_casts(onnx.TensorProto.BOOL, F16, onnx.TensorProto.STRING)
    assert RemoveCastPairs()(model).stats["cast_pairs_removed"] == 0
