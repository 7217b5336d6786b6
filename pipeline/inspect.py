"""``tforge inspect``: what is in an ONNX file, without running it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import InputError


def _type_name(value_info: Any) -> str:
    import onnx

    elem = value_info.type.tensor_type.elem_type
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else "?"


def inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    from pipeline.stages.export import MODEL_FILE, onnx_dims, onnx_size

    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise InputError(
            f"{path} has no {MODEL_FILE}", "pass an .onnx file or a folder holding model.onnx"
        )
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError (protobuf) and others for non-ONNX bytes
        raise InputError(f"{file} is not an ONNX model ({type(error).__name__})") from None
    graph = model.graph
    ops = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in graph.node
    )
    parameters = 0
    for init in graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        parameters += count
    return {
        "path": str(file),
        "size_bytes": onnx_size(file.parent) if file.name == MODEL_FILE else file.stat().st_size,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "nodes": len(graph.node),
        "initializers": len(graph.initializer),
        "parameters": parameters,
        "inputs": [
            {"name": i.name, "type": _type_name(i), "shape": onnx_dims(i)} for i in graph.input
        ],
        "outputs": [
            {"name": o.name, "type": _type_name(o), "shape": onnx_dims(o)} for o in graph.output
        ],
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
