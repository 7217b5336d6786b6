"""A model compiled for fixed input shapes, serving any input that fits one of them.

OpenVINO compiles a model whose inputs have fixed shapes into a faster program than one with
dynamic batch and sequence axes: shapes are inferred, memory planned and kernels chosen once,
and chains of elementwise ops fuse into one kernel. all-MiniLM-L6-v2 in NNCF's INT8 (2 threads,
a Xeon with AMX) runs b1s128 in 3.95 ms compiled for that shape against 4.77 ms with dynamic
axes, and b8s128 in 22.8 against 26.4 ms. ONNX Runtime's CPU provider gains nothing from it
(dynamic INT8 b1s128: 9.08 against 9.14 ms), so only the ``ort-openvino`` target offers it
(``static_shapes: true`` in a variant; the shapes are the recipe's ``shapes``).

:class:`StaticShapeRunner` holds one session per shape, each created on first use, and runs an
input on the smallest shape that holds it, as a static deployment serves a shorter request:

* columns past the input's sequence are padding (token id 0, attention mask 0), which the
  attention masks out, so the real tokens' outputs are the input's own;
* rows past the input's batch are copies of its first row: a row with no real token is a
  fully masked softmax, which OpenVINO turns into NaN (MiniLM's ov-bf16 graph, measured), and
  a padded row is thrown away anyway;
* the outputs are cut back to the input's rows and sequence (the output dims the export named
  like the inputs' batch and sequence axes).

A batch with more rows than the largest shape runs in chunks; a sequence longer than every
shape is refused. The ONNX file is unchanged: the fixed shape is a session setting
(:func:`pipeline.backends.openvino_backend.reshape_input`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.onnxruntime_backend import require_inputs
from pipeline.errors import InputError

#: (batch, sequence)
Shape = tuple[int, int]


@dataclass(frozen=True)
class Chunk:
    """Rows ``start:stop`` of an input, run on the session compiled for ``shape``."""

    start: int
    stop: int
    shape: Shape


def plan_chunks(shapes: Sequence[Shape], batch: int, sequence: int) -> list[Chunk]:
    """Which compiled shape runs which rows of a ``batch`` x ``sequence`` input.

    Each chunk takes the smallest shape (fewest positions) with room for its rows and the
    sequence; rows beyond the largest such batch go to further chunks.
    """
    fitting = [s for s in shapes if s[1] >= sequence]
    if not fitting:
        longest = max(s for _, s in shapes)
        raise InputError(
            f"an input of {sequence} tokens is longer than every static shape "
            f"({', '.join(f'b{b}s{s}' for b, s in sorted(shapes))})",
            f"add a sequence length >= {sequence} to shapes.sequence, or cut the input "
            f"to {longest} tokens (data.max_length)",
        )
    largest = max(b for b, _ in fitting)
    chunks = []
    for start in range(0, batch, largest):
        rows = min(largest, batch - start)
        shape = min((s for s in fitting if s[0] >= rows), key=lambda s: (s[0] * s[1], s))
        chunks.append(Chunk(start, start + rows, shape))
    return chunks


def pad(array: np.ndarray, shape: Shape) -> np.ndarray:
    """A ``[batch, sequence]`` input grown to ``shape``: zeros to the right (token id 0 and
    attention mask 0: padding), then copies of the first row below."""
    rows, columns = array.shape
    out = np.zeros(shape, dtype=array.dtype)
    out[:rows, :columns] = array
    out[rows:] = out[0]
    return out


@dataclass(frozen=True)
class Axes:
    """The two dynamic axes of a model's inputs, and where each output has them."""

    inputs: list[str]
    batch: str
    sequence: str
    #: Output name -> each dim's axis name, None where the dim is neither axis.
    outputs: dict[str, tuple[str | None, ...]]

    @classmethod
    def of(cls, path: Path) -> Axes:
        """Read from the model file; refuses inputs other than ``[batch, sequence]`` and
        outputs whose first dim is not the batch."""
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        axes: tuple[str, ...] = ()
        for value in inputs:
            dims = tuple(d.dim_param for d in value.type.tensor_type.shape.dim)
            if len(dims) != 2 or "" in dims or (axes and dims != axes):
                raise InputError(
                    f"{path.name}: static shapes need every input as [batch, sequence] with the "
                    f"same named dynamic axes; {value.name} has dims {list(dims)}",
                    "leave static_shapes off for this model",
                )
            axes = dims
        if not axes:
            raise InputError(f"{path.name} has no inputs", "check the exported model")
        outputs = {
            o.name: tuple(
                d.dim_param if d.dim_param in axes else None for d in o.type.tensor_type.shape.dim
            )
            for o in graph.output
        }
        for name, dims in outputs.items():
            if not dims or dims[0] != axes[0]:
                raise InputError(
                    f"{path.name}: output {name} does not have the batch axis first "
                    f"({list(dims)}), so padded rows could not be cut off",
                    "leave static_shapes off for this model",
                )
        return cls([i.name for i in inputs], axes[0], axes[1], outputs)


class StaticShapeRunner:
    """Sessions compiled for fixed ``[batch, sequence]`` shapes, one per shape, made on first
    use by ``make(input shapes)`` (runners with ``prepare``/``call``/``fetch``);
    ``prepare``/``call``/``run`` as every runner."""

    def __init__(
        self,
        path: Path,
        shapes: Sequence[Shape],
        make: Callable[[dict[str, tuple[int, int]]], Any],
        name: str = "onnxruntime",
    ) -> None:
        if not shapes:
            raise ValueError("static shapes: no shape given")
        self.path = path
        self.name = name
        self.shapes = tuple(sorted(set(shapes)))
        self._make = make
        self.axes = Axes.of(path)
        self.input_names = self.axes.inputs
        self.output_names = list(self.axes.outputs)
        self._sessions: dict[Shape, Any] = {}

    def session(self, shape: Shape) -> Any:
        """The runner compiled for ``shape`` (compiled now if this is its first use)."""
        if shape not in self._sessions:
            self._sessions[shape] = self._make({n: shape for n in self.input_names})
        return self._sessions[shape]

    def prepare(self, feed: dict[str, np.ndarray]) -> list[tuple[Chunk, Any, int]]:
        require_inputs(self.path, self.input_names, feed)
        batch, sequence = feed[self.input_names[0]].shape
        prepared = []
        for chunk in plan_chunks(self.shapes, batch, sequence):
            padded = {
                n: pad(np.ascontiguousarray(feed[n][chunk.start : chunk.stop]), chunk.shape)
                for n in self.input_names
            }
            prepared.append((chunk, self.session(chunk.shape).prepare(padded), sequence))
        return prepared

    def call(self, prepared: list[tuple[Chunk, Any, int]]) -> list[Any]:
        return [self.session(chunk.shape).call(inputs) for chunk, inputs, _ in prepared]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = self.prepare(feed)
        return self.outputs(prepared, self.call(prepared))

    def outputs(
        self, prepared: list[tuple[Chunk, Any, int]], results: list[Any]
    ) -> dict[str, np.ndarray]:
        """The outputs of ``call(prepared)``, cut back to the feed's rows and sequence."""
        axes = self.axes
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for (chunk, _, sequence), result in zip(prepared, results, strict=True):
            outputs = self.session(chunk.shape).fetch(result)
            for name, value in zip(self.output_names, outputs, strict=True):
                cut = tuple(
                    slice(0, chunk.stop - chunk.start)
                    if axis == axes.batch
                    else slice(0, sequence)
                    if axis == axes.sequence
                    else slice(None)
                    for axis in axes.outputs[name]
                )
                parts[name].append(np.asarray(value, dtype=np.float32)[cut])
        return {name: np.concatenate(values) for name, values in parts.items()}
