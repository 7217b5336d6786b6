"""Weights that already lie on a block grid (dequantized GGUF) are stored on it exactly.

The grids are made here as llama.cpp makes them (Q4_1: ``d * q + m`` per block of 32 with
float16 ``d`` and ``m``; Q4_0: ``d * (q - 8)``; Q8_0: ``d * q``, ``|q| <= 127``), and the
MatMulNBits that hold them are run by ONNX Runtime against NumPy's float product.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.decoders.grid import find_grid, narrowest_grid, store_grids

BLOCK = 32


def q4_1(weight: np.ndarray) -> np.ndarray:
    """``[K, N]`` float weights snapped onto Q4_1 blocks of 32 along K (as dequantized)."""
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // BLOCK, BLOCK)
    low, high = blocks.min(axis=2, keepdims=True), blocks.max(axis=2, keepdims=True)
    d = ((high - low) / 15).astype(np.float16).astype(np.float32)
    d[d == 0] = 1  # a constant block
    m = low.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((blocks - m) / d), 0, 15)
    return (d * q + m).reshape(n, k).T.astype(np.float32)


def q4_0(weight: np.ndarray) -> np.ndarray:
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // BLOCK, BLOCK)
    index = np.abs(blocks).argmax(axis=2)[..., None]
    signed = np.take_along_axis(blocks, index, axis=2)
    d = (signed / -8).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(blocks / d + 8), 0, 15)
    return (d * (q - 8)).reshape(n, k).T.astype(np.float32)


def q8_0(weight: np.ndarray) -> np.ndarray:
    k, n = weight.shape
    blocks = weight.T.reshape(n, k // BLOCK, BLOCK)
    d = (np.abs(blocks).max(axis=2, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    d[d == 0] = 1  # an all-zero block (the padding token's embedding)
    q = np.clip(np.rint(blocks / d), -127, 127)
    return (d * q).reshape(n, k).T.astype(np.float32)


def random_weight(k: int = 96, n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) * 0.05


@pytest.mark.parametrize(
    ("snap", "bits", "remainder"), [(q4_1, 4, True), (q4_0, 4, False), (q8_0, 8, False)]
)
def test_a_gguf_grid_is_found_and_holds_the_weights_exactly(
    snap: Any, bits: int, remainder: bool
) -> None:
    weight = snap(random_weight())
    grids = {b: find_grid(weight, b) for b in (4, 8)}
    grid = grids[4] or grids[8]
    assert grid is not None and grid.bits == bits
    if bits == 8:
        assert grids[4] is None  # 255 levels do not fit 4 bits
    assert (grid.remainder is not None) == remainder
    # Every weight is the grid's, to float32 rounding of the block's values.
    scale = np.abs(weight).max()
    assert np.abs(grid.dequantized() - weight).max() <= 1e-6 * scale
    assert grid.levels.max() <= 2**bits - 1
    # The narrowest grid is the one found, fitted once per weight's bytes.
    fitted: dict[str, Any] = {}
    first = narrowest_grid(weight, BLOCK, fitted)
    assert first is not None and first.bits == bits and len(fitted) == 1
    assert narrowest_grid(weight.copy(), BLOCK, fitted) is first
    assert narrowest_grid(random_weight(), BLOCK, fitted) is None and len(fitted) == 2


def test_all_positive_and_constant_blocks_keep_valid_zero_points() -> None:
    weight = q8_0(np.abs(random_weight(seed=8)))  # every weight positive
    weight[:BLOCK, :3] = 0.25  # constant blocks
    weight[:BLOCK, 3] = 0.0
    for bits in (4, 8):
        grid = find_grid(weight, bits)
        if grid is None:
            continue
        assert grid.zero_points.max() <= 2**bits - 1 and grid.levels.max() <= 2**bits - 1
        assert np.abs(grid.dequantized() - weight).max() <= 1e-6 * np.abs(weight).max()
    assert find_grid(weight, 8) is not None


def test_weights_on_no_grid_are_not_taken_for_one() -> None:
    weight = random_weight()
    assert find_grid(weight, 4) is None and find_grid(weight, 8) is None
    # A Q4_1 grid moved by a thousandth of a step is no longer that grid.
    snapped = q4_1(weight)
    step = (snapped.max() - snapped.min()) / 15
    moved = snapped + np.random.default_rng(1).uniform(-1e-3, 1e-3, snapped.shape) * step
    assert find_grid(moved.astype(np.float32), 4) is None
    # K must hold whole blocks.
    assert find_grid(q4_1(random_weight(k=64))[:48], 4) is None


def matmul_model(weights: dict[str, np.ndarray]) -> Any:
    """One 3-D input (as a decoder's hidden states) through MatMuls with constant weights."""
    from onnx import TensorProto, helper, numpy_helper

    k = next(iter(weights.values())).shape[0]
    nodes = [helper.make_node("MatMul", ["x", n], [f"y.{n}"], name=f"mm.{n}") for n in weights]
    outputs = [
        helper.make_tensor_value_info(f"y.{n}", TensorProto.FLOAT, [None, None, None])
        for n in weights
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
        outputs,
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    )


def run(model: Any, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, {"x": x})]


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_matmulnbits_on_the_grid_computes_the_float_product(accuracy_level: int) -> None:
    weights = {
        "a": q4_1(random_weight(seed=2)),
        "b": q4_1(random_weight(seed=3)),
        "head": q8_0(random_weight(seed=4)),
        "plain": random_weight(seed=5),
    }
    model = matmul_model(weights)
    x = np.random.default_rng(6).standard_normal((2, 5, 96)).astype(np.float32)
    expected = [x @ w for w in weights.values()]
    nodes = [n for n in model.graph.node if n.op_type == "MatMul"]
    stats = store_grids(model, nodes, BLOCK, accuracy_level)
    ops = [n.op_type for n in model.graph.node]
    if accuracy_level == 0:
        # No fast float kernel for 8 bits on the CPU: the Q8_0 weight stays a float MatMul.
        assert stats["bits"] == {"4": 2} and stats["float"] == {"mm.head": 8}
    else:
        assert stats["bits"] == {"4": 2, "8": 1} and stats["float"] == {}
    assert stats["corrected"] == 2 and "mm.plain" not in stats["nodes"]
    # The two Q4_1 MatMuls read one input: its block sums are computed once.
    assert ops.count("MatMulNBits") == sum(stats["bits"].values())
    assert sum(1 for n in model.graph.node if n.name.endswith("grid.block_sums")) == 1
    # The replaced float weights are gone from the file.
    names = {i.name for i in model.graph.initializer}
    assert "a" not in names and "b" not in names and "plain" in names
    got = run(model, x)
    for name, out, want in zip(weights, got, expected, strict=True):
        error = np.abs(out - want).max() / np.abs(want).max()
        if accuracy_level == 0 or name == "plain":
            assert error < 1e-5, (name, error)
        else:
            # INT8 products quantize the activations per block: close, not exact.
            assert 1e-5 < error < 0.05, (name, error)


def test_without_the_remainder_product_the_q4_1_grid_would_be_off() -> None:
    """The float remainder is what an integer zero point cannot hold: dropping it moves the
    product by far more than float rounding (so the correction is doing real work)."""
    weight = q4_1(random_weight(seed=7))
    grid = find_grid(weight, 4)
    assert grid is not None and grid.remainder is not None
    without = grid.dequantized() - np.repeat(grid.remainder, BLOCK, axis=0)
    assert np.abs(without - weight).max() > 0.1 * grid.scales.min()


def snap_checkpoint(folder: Path) -> Path:
    """Put the tiny Llama's projections on Q4_1 grids and its embedding and LM head on Q8_0,
    as a model dequantized from a GGUF file."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                snap = q8_0 if name == "lm_head" else q4_1
                weight = module.weight.detach().numpy().T
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(snap(weight).T)))
        table = model.model.embed_tokens.weight
        table.copy_(torch.from_numpy(np.ascontiguousarray(q8_0(table.detach().numpy().T).T)))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gguf_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.decoders.test_build import tiny_llama

    return snap_checkpoint(tiny_llama(tmp_path_factory.mktemp("gguf-llama")))


def test_a_build_keeps_the_grid_and_generates_pytorchs_tokens(
    gguf_like: Path, tmp_path: Path
) -> None:
    from pipeline.build import BuildOptions, build
    from pipeline.recipe import parse_recipe
    from tests.decoders.test_build import LAYERS, WEIGHT_MATMULS, contender, recipe_data

    data = recipe_data(gguf_like)
    data["latency"] = {"enabled": False}
    data["variants"] = [
        {"name": "int4", "precision": "int4"},
        {
            "name": "int4-grid",
            "precision": "int4",
            "quantize": {"keep_grid": True, "compute": "float"},
        },
        {"name": "int4-grid-int8", "precision": "int4", "quantize": {"keep_grid": True}},
    ]
    data["gates"] = {"min_token_match": 1.0, "variants": ["int4-grid"]}
    outcome = build(parse_recipe(data), BuildOptions(artifacts=tmp_path))
    assert outcome.passed, [str(c) for c in outcome.report.checks if not c.passed]
    grid = contender(outcome, "int4-grid")
    stored = grid.quantization["grid"]
    assert stored["bits"] == {"4": 4 * LAYERS} and stored["corrected"] == 4 * LAYERS
    # The LM head, on its Q8_0 grid, stays a float MatMul (exact either way).
    assert list(stored["float"].values()) == [8]
    assert grid.quantization["quantized_matmuls"] == WEIGHT_MATMULS - 1
    assert grid.accuracy["token_match"] == 1.0 and grid.accuracy["agreement"] == 1.0
    assert grid.accuracy["max_abs_error"] < 1e-4
    # Rounded onto a new 4-bit grid, the same weights move the logits by far more.
    rounded = contender(outcome, "int4")
    assert rounded.accuracy["max_abs_error"] > 100 * grid.accuracy["max_abs_error"]
    # With INT8 products the 8-bit LM head is stored too, and the activations are rounded.
    fast = contender(outcome, "int4-grid-int8")
    assert fast.quantization["grid"]["bits"] == {"4": 4 * LAYERS, "8": 1}
    assert fast.quantization["quantized_matmuls"] == WEIGHT_MATMULS
    assert grid.accuracy["max_abs_error"] < fast.accuracy["max_abs_error"]
    markdown = (outcome.run_dir / "report.md").read_text()
    assert "weights kept on their own grid: 8 at 4 bits" in markdown
    # The variant that rounded them is told that the weights had a grid of their own.
    hints = [n for n in outcome.report.notes if "already lie on 4-bit block grids" in n]
    assert [h.split(":")[0] for h in hints] == ["int4"]
