"""``tforge inspect``: what is in an ONNX file, without running it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.errors import InputError


def _type_name(value_info: Any) -> str:
    import onnx

    elem = value_info.type.tensor_type.elem_type
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else "?"


def inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    from pipeline.stages.export import MODEL_FILE, model_stats, onnx_size

    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        others = sorted(p.name for p in path.glob("*.onnx")) if path.is_dir() else []
        raise InputError(
            f"{path} has no {MODEL_FILE}"
            + (f" (it holds {', '.join(others)}: a decoder's graphs)" if others else ""),
            f"pass one of them: {path / others[0]}"
            if others
            else "pass an .onnx file or a folder holding model.onnx",
        )
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError (protobuf) and others for non-ONNX bytes
        raise InputError(f"{file} is not an ONNX model ({type(error).__name__})") from None
    if not model.graph.node and not model.graph.input and not model.ir_version:
        # Protobuf reads an empty file (or one of zeros) as a default, empty message.
        raise InputError(f"{file} is not an ONNX model (it holds no graph)")
    missing = sorted(
        {
            entry.value
            for init in model.graph.initializer
            if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data
            if entry.key == "location" and not (file.parent / entry.value).is_file()
        }
    )
    if missing:
        raise InputError(
            f"{file} keeps its weights in {', '.join(missing)}, which is not beside it",
            "copy the model's folder whole",
        )
    stats = model_stats(model)
    types = {v.name: _type_name(v) for v in [*model.graph.input, *model.graph.output]}
    return {
        "path": str(file),
        "size_bytes": onnx_size(file),
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": stats["opset"],
        "nodes": stats["nodes"],
        "initializers": stats["initializers"],
        "parameters": sum(math.prod(init.dims) for init in model.graph.initializer),
        "inputs": [
            {"name": n, "type": types[n], "shape": dims} for n, dims in stats["inputs"].items()
        ],
        "outputs": [
            {"name": n, "type": types[n], "shape": dims} for n, dims in stats["outputs"].items()
        ],
        "ops": stats["ops"],
    }
