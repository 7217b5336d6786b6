"""Stage ``export``: PyTorch -> ONNX with dynamic batch and sequence axes.

Uses ``torch.onnx.export(..., dynamo=True)`` with keyword inputs. Two traps, both guarded:

* ``input_names`` must not be passed with keyword inputs: the exporter renames inputs by their
  flattened position, which silently swaps e.g. ``attention_mask`` and ``token_type_ids``
  (seen: max error 4.6 on MiniLM). Names come from the keywords; we check them afterwards.
* The exporter can leave the module in training mode, which switches dropout on for anything
  that runs the model afterwards; the wrapper and the model are put back in eval mode.

Postconditions: ``onnx.checker`` (full check, with shape inference), the graph's inputs and
output are the expected names, and batch and sequence are symbolic dimensions.

Output: ``model/`` with ``model.onnx``, ``config.json`` and the tokenizer files, the layout
other tools (Optimum's ORTModel, plain onnxruntime) load.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.artifacts import Artifact
from pipeline.errors import ExportError, PreconditionError, first_line
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.load import TOKENIZER_FILES, CheckpointInfo, loaded_model

log = logging.getLogger(__name__)

#: Example inputs for tracing: two texts of different lengths, so no axis is specialised to 1.
EXAMPLE_TEXTS = (
    "Compile the trained model once.",
    "Then verify every variant against the original, with padding, before it ships anywhere.",
)
MODEL_FILE = "model.onnx"
_TWO_GB = 2**31 - 1


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter logs optional-dependency notes and prints its progress; keep both out of
    our output (progress is ours to show, and CI logs stay readable)."""
    names: tuple[str, ...] = (
        "torch.onnx",
        "torch.export",
        "torch._export",
        "onnxscript",
        "torch._dynamo",
        "torch.fx",
        "transformers.exporters",
    )
    try:
        # This module's logger is named by its file path, outside the "transformers" tree.
        from transformers.exporters import exporter_dynamo

        names += (exporter_dynamo.logger.name,)
    except (ImportError, AttributeError):
        pass
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _summarise(error: BaseException) -> str:
    """The exporter's own words, short: its outer message and the root cause's first line.

    torch.onnx wraps the real reason (e.g. a data-dependent guard in torch.export) in a
    several-paragraph message; the chain's last link is what a user can act on.
    """
    root = error
    while (cause := root.__cause__ or root.__context__) is not None and cause is not root:
        root = cause
    outer = first_line(error).split(". ")[0][:160]
    if root is error:
        return f"{type(error).__name__}: {outer}"
    return f"{outer}: {type(root).__name__}: {first_line(root, 240)}"


def onnx_size(path: Path) -> int:
    """Bytes of an ONNX file plus the external-data files its initializers name."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    external = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in external)


def save_onnx(model: Any, path: Path) -> None:
    """``model`` at ``path``; its weights go to ``<name>.data`` beside it when the whole would
    pass protobuf's 2 GB limit."""
    import onnx

    large = model.ByteSize() > _TWO_GB
    onnx.save(model, str(path), save_as_external_data=large, location=path.name + ".data")


def load_onnx(path: Path) -> Any:
    """An ONNX model with its external weights read in.

    ``onnx.load`` refuses external data behind a hard link or a symbolic link (a guard against
    link attacks), and the artifact store hard-links cached files into run folders; the data
    files tforge wrote itself are read here instead, from the model's own folder only.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    folder = path.parent.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in tensor.external_data}
        location = entry.get("location", "")
        file = (folder / location).resolve()
        if not location or file.parent != folder or not file.is_file():
            raise PreconditionError(
                f"{path.name}: tensor {tensor.name} names external data {location!r}, which is "
                "not a file beside the model",
                "re-export the model",
            )
        size = file.stat().st_size
        offset = int(entry.get("offset", 0))
        length = int(entry["length"]) if "length" in entry else size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise PreconditionError(
                f"{path.name}: tensor {tensor.name} reads bytes {offset}..{offset + length} of "
                f"{location}, which holds {size}",
                "the weights file is truncated or belongs to another model: re-export it",
            )
        with file.open("rb") as handle:
            handle.seek(offset)
            tensor.raw_data = handle.read(length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def uses_external_data(model: Any) -> bool:
    """Whether an ONNX model (loaded without its weights) keeps weights in a data file."""
    import onnx

    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def require_model_file(stage: str, folder: Path) -> None:
    """The precondition of every stage that reads a model folder."""
    if not (folder / MODEL_FILE).is_file():
        raise PreconditionError(f"{stage}: {folder} has no {MODEL_FILE}", "run export first")


def onnx_dims(value_info: Any) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def graph_stats(path: Path) -> dict[str, Any]:
    """Counts of an ONNX file (without loading external weights)."""
    import onnx

    return model_stats(onnx.load(str(path), load_external_data=False))


def model_stats(model: Any) -> dict[str, Any]:
    """Opsets, node and initializer counts, op histogram, input and output shapes."""
    ops = Counter(
        node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        for node in model.graph.node
    )
    return {
        "opset": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "inputs": {i.name: onnx_dims(i) for i in model.graph.input},
        "outputs": {o.name: onnx_dims(o) for o in model.graph.output},
    }


#: Node metadata that names files on this machine (the exporter's Python stack traces, with
#: absolute paths of site-packages): dropped, or the same model exported from two installs
#: gives two different files. The module namespace and name scopes, which map nodes back to
#: the model's modules, stay.
_MACHINE_SPECIFIC = ("pkg.torch.onnx.stack_trace",)


def _drop_machine_specific_metadata(model: Any) -> None:
    import onnx_ir as ir

    graphs = [model.graph, *(f for f in model.functions.values())]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for key in _MACHINE_SPECIFIC:
                node.metadata_props.pop(key, None)


class ExportConfig(StageConfig):
    opset: int


class ExportStage(Stage[ExportConfig]):
    name = "export"
    version = 2  # 2: machine-specific stack traces dropped from node metadata

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        import torch

        from pipeline.backends.torch_backend import task_module

        folder = inputs["checkpoint"].path
        info = CheckpointInfo.read(inputs["info"])
        loaded = loaded_model(ctx, folder, info.task)
        module = task_module(loaded.model, info.task, tuple(info.inputs))
        encoded = loaded.tokenizer(list(EXAMPLE_TEXTS), padding=True, return_tensors="pt")
        kwargs = {name: encoded[name] for name in info.inputs}
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = {name: {0: batch, 1: sequence} for name in info.inputs}
        try:
            with quiet_exporter():
                program = torch.onnx.export(
                    module,
                    (),
                    kwargs=kwargs,
                    dynamo=True,
                    dynamic_shapes=dynamic,
                    output_names=[info.output],
                    opset_version=self.config.opset,
                    optimize=True,
                    verbose=False,
                )
        # The exporter fails in many ways (torch.export's UserError and Unsupported, the ONNX
        # translator's errors, plain RuntimeError): all mean "this model does not export".
        except Exception as error:
            log.debug("export failed", exc_info=True)
            raise ExportError(
                f"{info.architecture['model_type']} cannot be exported to ONNX: {_summarise(error)}",
                "run with -v for the exporter's full message",
            ) from error
        finally:
            module.eval()
            loaded.model.eval()
        if program is None:
            raise ExportError("the exporter returned no program")
        target = out / "model"
        target.mkdir()
        model_path = target / MODEL_FILE
        size = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
        _drop_machine_specific_metadata(program.model)
        with quiet_exporter():
            program.save(str(model_path), external_data=size > _TWO_GB)
        self._check(model_path, info)
        for name in ("config.json", *TOKENIZER_FILES):
            if (folder / name).is_file():
                shutil.copy2(folder / name, target / name)
        return StageResult(outputs={"model": "model"}, stats=graph_stats(model_path))

    def _check(self, path: Path, info: CheckpointInfo) -> None:
        import onnx

        try:
            onnx.checker.check_model(str(path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            raise ExportError(
                f"the exported graph is not valid ONNX: {_summarise(error)}"
            ) from None
        model = onnx.load(str(path), load_external_data=False)
        got_inputs = sorted(i.name for i in model.graph.input)
        if got_inputs != sorted(info.inputs):
            raise ExportError(
                f"the exported graph takes inputs {got_inputs}, expected {sorted(info.inputs)}"
            )
        outputs = [o.name for o in model.graph.output]
        if outputs != [info.output]:
            raise ExportError(
                f"the exported graph gives outputs {outputs}, expected [{info.output!r}]"
            )
        for graph_input in model.graph.input:
            dims = onnx_dims(graph_input)
            if len(dims) != 2 or not all(isinstance(d, str) and d for d in dims):
                raise ExportError(
                    f"input {graph_input.name} has shape {dims}: batch and sequence must both stay dynamic",
                    "the model specialised an axis during tracing; report it with -v output",
                )
