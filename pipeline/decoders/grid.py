"""Weights that already lie on a block quantization grid, stored on that grid exactly.

A model read from a GGUF file is dequantized to float by transformers, but its weights keep the
grid they were quantized on: llama.cpp's Q4_1 stores every block of 32 weights (along the input
dimension) as ``scale * q + minimum`` with ``q`` in 0..15, Q4_0 and Q8_0 as ``scale * q`` with
signed ``q``, and the K-quants' 32-weight sub-blocks the same way. Re-quantizing those floats by
round-to-nearest onto a new grid moves almost every weight even though none needs rounding:
measured on SmolLM2-135M (Q4_1 linears, a Q8_0 LM head), 4-bit RTN keeps 0.12 of the greedy
tokens and blockwise 8-bit RTN 0.67.

``find_grid`` recovers each block's grid from the float weights alone (no GGUF parsing, so it
also holds for any checkpoint saved from a block-quantized model), and ``to_matmulnbits`` stores
it in ONNX Runtime's ``MatMulNBits`` as ``(q - zero_point) * scale``. The zero point of
MatMulNBits is an integer (the CPU kernel takes float zero points only for 4 bits, and then
dequantizes the whole matrix on every call: 40x slower at batch 1, measured), so a grid whose
minimum is not a whole number of steps from zero leaves a remainder per block and output
channel, ``E``. Its share of the product is added back in float: ``(X @ P) @ E``, where ``P``
sums each block of X's channels (a few percent of the MatMul's multiply-adds). The
quantized weights then equal the float ones to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: A block fits a grid when every weight is within this fraction of the block's largest
#: magnitude of a grid point: a few float32 roundings (a grid a step's thousandth away from the
#: true one would pass a looser test and move weights by that much times the level).
TOLERANCE = 1e-6
#: Columns handled at once (bounds the float64 work arrays for a large LM head).
_CHUNK = 4096


@dataclass(frozen=True)
class Grid:
    """A ``[K, N]`` weight as ``MatMulNBits`` holds it: ``w = (q - zero_points) * scales + E``."""

    bits: int
    block_size: int
    #: ``[N, K / block_size, block_size]`` levels, 0 to 2**bits - 1.
    levels: np.ndarray
    #: ``[N, K / block_size]`` float32.
    scales: np.ndarray
    #: ``[N, K / block_size]`` uint8.
    zero_points: np.ndarray
    #: ``[K / block_size, N]`` float32 remainders, or None where every one is zero.
    remainder: np.ndarray | None

    def dequantized(self) -> np.ndarray:
        """The ``[K, N]`` float weight this grid holds (for checks)."""
        steps = self.levels.astype(np.float32) - self.zero_points[..., None].astype(np.float32)
        blocks = steps * self.scales[..., None]
        if self.remainder is not None:
            blocks = blocks + self.remainder.T[..., None]
        n, nb, b = blocks.shape
        return np.ascontiguousarray(blocks.reshape(n, nb * b).T)


def _fit(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, ...] | None:
    """Levels, scales, zero points and remainders of ``blocks`` ([n, nb, b] float64), or None
    where some block lies on no grid of ``bits`` bits.

    Two forms are tried per block: a signed grid through zero (``scale * r``: Q4_0, Q8_0), which
    needs no remainder, and a min-max grid (``scale * q + minimum``: Q4_1 and the K-quants).
    """
    top = 2**bits - 1
    low, high = blocks.min(axis=2), blocks.max(axis=2)
    bound = np.maximum(-low, high)
    fits = np.zeros(low.shape, dtype=bool)
    levels = np.zeros(blocks.shape, dtype=np.int64)
    scales = np.ones(low.shape)
    zeros = np.zeros(low.shape, dtype=np.int64)
    # Signed grids: the largest magnitude is the 2**(bits-1) or 2**(bits-1) - 1'th step.
    for extent in (2 ** (bits - 1), 2 ** (bits - 1) - 1):
        scale = np.where(bound > 0, bound / extent, 1.0)
        steps = np.rint(blocks / scale[..., None])
        error = np.abs(steps * scale[..., None] - blocks).max(axis=2)
        # The zero point is a level: the block's lowest step sits at level 0, or above it
        # when every step is positive.
        zero = np.maximum(-steps.min(axis=2), 0)
        new = ~fits & (error <= TOLERANCE * bound) & (steps.max(axis=2) + zero <= top)
        levels = np.where(new[..., None], steps + zero[..., None], levels).astype(np.int64)
        scales = np.where(new, scale, scales)
        zeros = np.where(new, zero, zeros).astype(np.int64)
        fits |= new
    signed = fits.copy()
    # Min-max grids: the minimum is level 0 and the maximum level 2**bits - 1.
    scale = np.where(high > low, (high - low) / top, 1.0)
    steps = np.rint((blocks - low[..., None]) / scale[..., None])
    error = np.abs(steps * scale[..., None] + low[..., None] - blocks).max(axis=2)
    new = ~fits & (error <= TOLERANCE * bound)
    zero = np.clip(np.rint(-low / scale), 0, top)
    levels = np.where(new[..., None], steps, levels).astype(np.int64)
    scales = np.where(new, scale, scales)
    zeros = np.where(new, zero, zeros).astype(np.int64)
    fits |= new
    if not fits.all():
        return None
    stored = scales.astype(np.float32).astype(np.float64)
    # The remainder is what the integer zero point cannot hold, taken against the float32 scale
    # that is stored, so the sum reproduces the block (a block's mean of its residuals).
    held = (levels - zeros[..., None]) * stored[..., None]
    remainder = np.where(signed, 0.0, (blocks - held).mean(axis=2))
    # A remainder within float32 rounding of the block's values is none.
    remainder[np.abs(remainder) <= 1e-6 * stored] = 0.0
    return levels, stored, zeros, remainder


def find_grid(weight: np.ndarray, bits: int, block_size: int = 32) -> Grid | None:
    """The grid of ``bits`` bits (or fewer) that every block of ``block_size`` rows of the
    ``[K, N]`` ``weight`` lies on, or None."""
    k, n = weight.shape
    if k % block_size:
        return None
    nb = k // block_size
    parts = []
    for start in range(0, n, _CHUNK):
        columns = weight[:, start : start + _CHUNK].astype(np.float64)
        blocks = columns.T.reshape(-1, nb, block_size)
        fitted = _fit(blocks, bits)
        if fitted is None:
            return None
        parts.append(fitted)
    levels, scales, zeros, remainder = (np.concatenate(p, axis=0) for p in zip(*parts, strict=True))
    nonzero = np.abs(remainder) > 0
    return Grid(
        bits=bits,
        block_size=block_size,
        levels=levels.astype(np.uint8),
        scales=scales.astype(np.float32),
        zero_points=zeros.astype(np.uint8),
        remainder=np.ascontiguousarray(remainder.T.astype(np.float32)) if nonzero.any() else None,
    )


def _packed(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 ``values`` at ``bits`` per value, low bits first (the
    layout MatMulNBits reads), padding an odd count with zero."""
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros_like(values[..., :1])], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def default_zero_point(bits: int) -> int:
    """The zero point MatMulNBits assumes when none is given (the middle level)."""
    return 2 ** (bits - 1)


def to_matmulnbits(
    grid: Grid, node: Any, accuracy_level: int, block_sums: str | None
) -> tuple[list[Any], list[Any], str | None]:
    """(nodes, initializers, block_sums) replacing the float MatMul ``node``.

    ``block_sums``: the name of a tensor holding the per-block sums of the node's input, made
    by an earlier node, or None. Where the grid has remainders and ``block_sums`` is None, the
    nodes made here compute it and the returned name is that tensor's, for later MatMuls of the
    same input.
    """
    from onnx import helper, numpy_helper

    n, nb, _ = grid.levels.shape
    k = nb * grid.block_size
    stem = node.name or node.output[0]
    inputs = [node.input[0], f"{stem}.grid.q", f"{stem}.grid.scales"]
    initializers = [
        numpy_helper.from_array(_packed(grid.levels, grid.bits), inputs[1]),
        numpy_helper.from_array(grid.scales.reshape(-1), inputs[2]),
    ]
    if (grid.zero_points != default_zero_point(grid.bits)).any():
        inputs.append(f"{stem}.grid.zero_points")
        initializers.append(
            numpy_helper.from_array(_packed(grid.zero_points, grid.bits).reshape(-1), inputs[-1])
        )
    product = node.output[0] if grid.remainder is None else f"{stem}.grid.product"
    quantized = helper.make_node(
        "MatMulNBits",
        inputs,
        [product],
        name=f"{stem}_Q{grid.bits}",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=grid.bits,
        block_size=grid.block_size,
        accuracy_level=accuracy_level,
    )
    quantized.metadata_props.extend(node.metadata_props)
    nodes = [quantized]
    if grid.remainder is None:
        return nodes, initializers, block_sums
    if block_sums is None:
        block_sums = f"{stem}.grid.block_sums"
        summing = np.kron(np.eye(nb, dtype=np.float32), np.ones((grid.block_size, 1), np.float32))
        initializers.append(numpy_helper.from_array(summing, f"{block_sums}.ones"))
        nodes.append(
            helper.make_node(
                "MatMul", [node.input[0], f"{block_sums}.ones"], [block_sums], name=block_sums
            )
        )
    initializers.append(numpy_helper.from_array(grid.remainder, f"{stem}.grid.remainder"))
    nodes += [
        helper.make_node(
            "MatMul",
            [block_sums, f"{stem}.grid.remainder"],
            [f"{stem}.grid.correction"],
            name=f"{stem}.grid.correction",
        ),
        helper.make_node(
            "Add",
            [product, f"{stem}.grid.correction"],
            [node.output[0]],
            name=f"{stem}.grid.add",
        ),
    ]
    return nodes, initializers, block_sums


#: Bit widths tried, fewest first: a weight is stored at the narrowest grid it lies on.
GRID_BITS = (4, 8)


def stored_bits(accuracy_level: int) -> tuple[int, ...]:
    """The grid widths MatMulNBits runs fast at this accuracy level on the CPU.

    With float products (level 0) ONNX Runtime's CPU kernel has no 8-bit path of its own: it
    dequantizes the whole matrix on every call (SmolLM2's LM head, 576 x 49152: 90 ms a call
    against 3.1 ms for the float MatMul and 1.0 ms for 4 bits, measured at batch 1).
    """
    return (4,) if accuracy_level == 0 else GRID_BITS


def narrowest_grid(
    weight: np.ndarray, block_size: int, fitted: dict[str, Grid | None] | None = None
) -> Grid | None:
    """The narrowest grid of :data:`GRID_BITS` the ``[K, N]`` ``weight`` lies on, or None.

    ``fitted`` remembers the answer per weight's bytes: a decoder's prefill and decode graphs
    hold the same weights, and fitting a large LM head takes seconds.
    """
    import hashlib

    key = (
        f"{weight.shape}:{block_size}:"
        + hashlib.blake2b(weight.tobytes(), digest_size=16).hexdigest()
    )
    if fitted is not None and key in fitted:
        return fitted[key]
    grid = next((g for b in GRID_BITS if (g := find_grid(weight, b, block_size)) is not None), None)
    if fitted is not None:
        fitted[key] = grid
    return grid


def store_grids(
    model: Any,
    nodes: list[Any],
    block_size: int,
    accuracy_level: int,
    fitted: dict[str, Grid | None] | None = None,
) -> dict[str, Any]:
    """Replace each of ``nodes`` (MatMuls with a constant ``[K, N]`` weight) whose weight lies
    on a grid of 4 or 8 bits by MatMulNBits holding that grid, in place.

    A weight on a grid that :func:`stored_bits` rules out stays a float MatMul (it is exact
    either way). Returns ``bits`` (MatMuls stored per bit width), ``corrected`` (those with a
    float remainder product), ``nodes`` (the replaced MatMuls) and ``float`` (MatMuls kept
    float, each with its grid's width). ``fitted``: see :func:`narrowest_grid`.
    """
    from onnx import numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    allowed = stored_bits(accuracy_level)
    replacement: dict[str, list[Any]] = {}
    made: list[Any] = []
    sums: dict[str, str | None] = {}
    bits: dict[str, int] = {}
    kept: dict[str, int] = {}
    corrected = 0
    for node in nodes:
        grid = narrowest_grid(numpy_helper.to_array(weights[node.input[1]]), block_size, fitted)
        if grid is None:
            continue
        if grid.bits not in allowed:
            kept[node.name] = grid.bits
            continue
        new, initializers, sums[node.input[0]] = to_matmulnbits(
            grid, node, accuracy_level, sums.get(node.input[0])
        )
        replacement[node.name] = new
        made += initializers
        bits[str(grid.bits)] = bits.get(str(grid.bits), 0) + 1
        corrected += grid.remainder is not None
    if replacement:
        body = [r for n in model.graph.node for r in replacement.get(n.name, [n])]
        del model.graph.node[:]
        model.graph.node.extend(body)
        used = {i for n in model.graph.node for i in n.input}
        kept_weights = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept_weights + made)
    return {
        "bits": dict(sorted(bits.items())),
        "corrected": corrected,
        "nodes": sorted(replacement),
        "float": dict(sorted(kept.items())),
    }
