"""The sensitivity measurement's rounding, against the quantizers it stands for."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.sensitivity import int8_input_blocks, quantize_blocks


def ort_blocks(weight: np.ndarray, bits: int, block: int) -> np.ndarray:
    """``weight`` [in, out] quantized by ONNX Runtime's MatMulNBits quantizer (symmetric blocks
    of ``block`` input channels per output column) and dequantized, as [in, out]."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight.shape
    blocks = -(-rows // block)
    per_byte = 8 // bits
    packed = np.zeros((cols, blocks, block // per_byte), dtype=np.uint8)
    zero = np.zeros((cols, -(-blocks // per_byte)), dtype=np.uint8)
    scales = np.zeros((cols, blocks), dtype=np.float32)
    padded = np.pad(weight, ((0, blocks * block - rows), (0, 0))).astype(np.float32)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, padded, scales, zero, block, cols, blocks * block, True)
    if bits == 4:
        # Two values a byte, the first in the low nibble.
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(cols, blocks, block)
    else:
        values = packed
    # Symmetric: no zero points are written; the kernel's is the middle level (8, or 128).
    levels = (values.astype(np.float64) - 2 ** (bits - 1)) * scales[..., None]
    return levels.reshape(cols, -1)[:, :rows].T


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_blocks_round_as_onnxruntime_does(bits: int) -> None:
    rng = np.random.default_rng(bits)
    # Heavy tails, a block of zeros, and an input width that is no multiple of the block.
    weight = rng.standard_t(3, size=(40, 7)).astype(np.float32)
    weight[16:32, 2] = 0.0
    ours = quantize_blocks(weight.T.astype(np.float64), bits, 16).T
    theirs = ort_blocks(weight, bits, 16)
    assert ours.shape == theirs.shape == weight.shape
    assert np.all(ours[16:32, 2] == 0)
    step = np.abs(weight).max() / 2 ** (bits - 1)
    # Equal but for float32 against float64 arithmetic at a rounding boundary.
    differs = ~np.isclose(ours, theirs, rtol=0, atol=1e-5 * step)
    assert differs.mean() <= 0.01
    assert np.abs(ours - theirs).max() <= step * 1.001


def test_input_blocks_put_each_blocks_largest_magnitude_at_127() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 40))
    rounded = int8_input_blocks(x, 16)
    assert rounded.shape == x.shape
    for start in (0, 16, 32):
        block = slice(start, start + 16)
        amax = np.abs(x[:, block]).max(axis=1, keepdims=True)
        # The largest magnitude is a level; every value is within half a step of its own.
        top = np.abs(x[:, block]).argmax(axis=1)
        rows = np.arange(5)
        np.testing.assert_allclose(rounded[:, block][rows, top], x[:, block][rows, top])
        assert np.all(np.abs(rounded[:, block] - x[:, block]) <= amax / 127 / 2 + 1e-12)
