"""Exported tiny models of every family, and helpers to run a pass list and compare graphs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from pipeline.architectures import family_of
from pipeline.stages.base import BuildContext
from pipeline.stages.export import MODEL_FILE
from pipeline.stages.load import CheckpointInfo
from tests.stages.helpers import run_export, run_load

TEXTS = [
    "Return a new list containing all items from the iterable.",
    "Short.",
    "The parser reads the header and the body of the message, then returns the result.",
]


@dataclass(frozen=True)
class Exported:
    family: str
    path: Path
    checkpoint: Path
    info: CheckpointInfo

    @property
    def layers(self) -> int:
        return int(self.info.architecture["layers"])

    def expected(self, fusion: str) -> int:
        """Fused ops the architecture spec expects for ``fusion`` in this model."""
        return family_of(self.info.architecture["model_type"]).expects(fusion) * self.layers

    def load(self) -> ir.Model:
        return ir.load(self.path)


@pytest.fixture(scope="session")
def exported(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    made: dict[str, Exported] = {}

    def get(family: str) -> Exported:
        if family not in made:
            ctx = BuildContext()
            folder = checkpoint(family)
            out = tmp_path_factory.mktemp(f"exported-{family}")
            info, _ = run_load(ctx, folder, out / "load")
            model, _ = run_export(ctx, folder, info, out / "export")
            made[family] = Exported(
                family, model.path / MODEL_FILE, folder, CheckpointInfo.read(info)
            )
        return made[family]

    return get


def outputs(model: ir.Model, exported: Exported, tmp_path: Path, side: str) -> np.ndarray:
    """The model's hidden states on padded text batches (``side`` padding), through ORT."""
    from transformers import AutoTokenizer

    from pipeline.backends.onnxruntime_backend import OrtRunner

    path = tmp_path / f"{id(model)}-{side}.onnx"
    ir.save(model, path)
    tokenizer = AutoTokenizer.from_pretrained(exported.checkpoint)
    tokenizer.padding_side = side
    encoded = tokenizer(TEXTS, padding=True, return_tensors="np")
    feed = {name: encoded[name].astype(np.int64) for name in exported.info.inputs}
    result = OrtRunner(path, 1, "disabled", name="test").run(feed)
    mask = encoded["attention_mask"].astype(bool)
    return np.asarray(next(iter(result.values())))[mask]


def max_difference(a: ir.Model, b: ir.Model, exported: Exported, tmp_path: Path) -> float:
    """Largest difference over real tokens, right- and left-padded batches both."""
    return max(
        float(
            np.abs(
                outputs(a, exported, tmp_path, side) - outputs(b, exported, tmp_path, side)
            ).max()
        )
        for side in ("right", "left")
    )


def unrelated_graph() -> ir.Model:
    """A small graph with nothing any pass should touch: Relu(MatMul(x, W)) + y."""
    import onnx
    from onnx import TensorProto, helper

    weight = onnx.numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "W"
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Add", ["r", "y"], ["out"]),
        ],
        "unrelated",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
        [weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def without_shapes(model: ir.Model) -> ir.Model:
    for node in model.graph:
        for value in node.outputs:
            value.shape = None
            value.type = None
    return model
