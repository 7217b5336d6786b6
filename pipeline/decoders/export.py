"""Export a decoder into ``prefill.onnx`` and ``decode.onnx`` with an explicit KV cache.

transformers' own exporter (``transformers.exporters.OnnxExporter.export_for_generation``) runs
``generate`` on a sample and exports each stage with dynamic batch, sequence and past length; we
use it rather than tracing our own wrapper, and only rename the cache tensors to short, stable
names: ``past.N.key`` / ``past.N.value`` in, ``present.N.key`` / ``present.N.value`` out, so the
generation runner and the reports do not depend on the exporter's naming.

The sample batch is left-padded on purpose: with an all-ones mask the exporter would drop the
``attention_mask`` input (it traces it as a constant), and a decode graph without it cannot serve
padded batches.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ExportError, first_line

PREFILL, DECODE = "prefill.onnx", "decode.onnx"
#: The one weights file both graphs read (see share_weights).
WEIGHTS = "weights.onnx.data"
#: Tensors smaller than this stay inside their graph.
_INLINE_BYTES = 1024
_ALIGN = 4096
#: The inputs the generation runner feeds, beside the cache (``past.N.key``/``value``).
FED = frozenset({"input_ids", "attention_mask", "position_ids"})
_CACHE = re.compile(r"^(?:(input|output)\.)?cache\.layers\.(\d+)\.(keys|values)$")


@dataclass(frozen=True)
class DecoderGraphs:
    folder: Path
    layers: int
    #: Inputs of each graph, in order (after renaming).
    prefill_inputs: tuple[str, ...]
    decode_inputs: tuple[str, ...]

    @property
    def prefill(self) -> Path:
        return self.folder / PREFILL

    @property
    def decode(self) -> Path:
        return self.folder / DECODE


def cache_name(original: str, graph: str) -> str | None:
    """The short name of an exporter cache tensor, or None for other tensors.

    ``cache.layers.3.keys`` (prefill output), ``output.cache.layers.3.keys`` (decode output)
    -> ``present.3.key``; ``input.cache.layers.3.values`` -> ``past.3.value``.
    """
    match = _CACHE.match(original)
    if match is None:
        return None
    direction, layer, kind = match.groups()
    prefix = "past" if direction == "input" else "present"
    if graph == "prefill" and direction == "input":
        raise ExportError(f"the prefill graph takes a cache input ({original}); expected none")
    return f"{prefix}.{layer}.{kind[:-1]}"


def _rename(path: Path, graph: str) -> tuple[str, ...]:
    """Rename the cache inputs and outputs of ``path`` in place; returns its input names."""
    import onnx_ir as ir

    model = ir.load(path)
    renamed = 0
    for value in [*model.graph.inputs, *model.graph.outputs]:
        new = cache_name(value.name or "", graph)
        if new is not None:
            value.name = new
            renamed += 1
    if renamed == 0:
        raise ExportError(f"{path.name} has no KV-cache inputs or outputs: not a decoder export")
    other = [
        v.name or ""
        for v in model.graph.inputs
        if v.name not in FED and not (v.name or "").startswith("past.")
    ]
    if other:
        # Gemma 2/3's sliding-window cache layers: each also carries its window as a tensor,
        # and keeps only the window's last tokens, so layers' caches differ in length.
        raise ExportError(
            f"{path.name} takes inputs the generation runner does not feed: {', '.join(other[:3])}",
            "sliding-window cache layers (Gemma 2 and 3) are not supported; use a model whose "
            "cache layers all grow with the text",
        )
    # Written beside, then moved over: the loaded model still reads its weights lazily from
    # the original data file.
    staging = path.parent / ".rename"
    staging.mkdir(exist_ok=True)
    ir.save(model, staging / path.name, external_data=path.name + ".data")
    names = tuple(v.name or "" for v in model.graph.inputs)
    del model
    for item in staging.iterdir():
        item.replace(path.parent / item.name)
    staging.rmdir()
    return names


def graph_files(folder: Path) -> list[Path]:
    """The files that make up a decoder's graphs: both .onnx files and their weights."""
    return sorted(
        f for f in folder.iterdir() if f.name.startswith(("prefill.onnx", "decode.onnx", WEIGHTS))
    )


def copy_companions(source: Path, out: Path) -> None:
    """Copy a decoder folder's files other than its graphs (config, tokenizer, export.json)."""
    graphs = set(graph_files(source))
    for item in source.iterdir():
        if item.is_file() and item not in graphs:
            shutil.copyfile(item, out / item.name)


def share_weights(folder: Path) -> dict[str, int]:
    """Store each weight of the prefill and decode graphs once, in ``weights.onnx.data``.

    The two graphs are exported (and quantized) separately, so each carries its own copy of
    every weight; equal tensors (same type, shape and bytes) are written once and both graphs
    point at that copy, which halves a decoder on disk. Each tensor starts on a 4 KiB boundary
    (ONNX Runtime may map the file). The file is written beside the graphs and renamed into
    place; the graphs' own data files are removed after.
    """
    import hashlib

    import onnx
    from onnx import numpy_helper

    from pipeline.stages.export import load_onnx

    models = {name: load_onnx(folder / name) for name in (PREFILL, DECODE)}
    placed: dict[str, tuple[int, int]] = {}
    total = 0
    staging = folder / f".{WEIGHTS}.tmp"
    with staging.open("wb") as out:
        for model in models.values():
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data"):
                    tensor.CopyFrom(
                        numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
                    )
                raw = tensor.raw_data
                if len(raw) < _INLINE_BYTES:
                    continue
                total += len(raw)
                key = hashlib.sha256(
                    f"{tensor.data_type}:{list(tensor.dims)}:".encode() + raw
                ).hexdigest()
                if key not in placed:
                    out.write(b"\0" * (-out.tell() % _ALIGN))
                    placed[key] = (out.tell(), len(raw))
                    out.write(raw)
                offset, length = placed[key]
                tensor.ClearField("raw_data")
                del tensor.external_data[:]
                for k, v in (
                    ("location", WEIGHTS),
                    ("offset", str(offset)),
                    ("length", str(length)),
                ):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
                tensor.data_location = onnx.TensorProto.EXTERNAL
    for name, model in models.items():
        onnx.save_model(model, str(folder / name))
        (folder / f"{name}.data").unlink(missing_ok=True)
    os.replace(staging, folder / WEIGHTS)
    stored = sum(length for _, length in placed.values())
    return {"weight_bytes": total, "stored_bytes": stored}


def sample_inputs(vocab_size: int, batch: int = 2, length: int = 8) -> dict[str, Any]:
    """A left-padded sample batch (the first row two tokens shorter)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(vocab_size, 4), (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def export_decoder(model: Any, out: Path, opset: int | None = None) -> DecoderGraphs:
    """Export ``model`` (a ``*ForCausalLM`` in eval mode) into ``out`` (absent or empty).

    The graphs are written and renamed in a temporary folder beside ``out``, which becomes
    ``out`` only when both are complete: a failed export leaves nothing half-written.
    """
    from transformers.exporters import OnnxConfig, OnnxExporter

    from pipeline.stages.export import quiet_exporter

    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty", "export a decoder into a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    sample = {**sample_inputs(int(model.config.vocab_size)), "max_new_tokens": 3}
    try:
        with quiet_exporter():
            exported = OnnxExporter().export_for_generation(
                model, sample, OnnxConfig(dynamic=True, opset_version=opset)
            )
    # The exporter raises whatever torch.export, onnxscript or the model itself raises.
    except Exception as error:
        raise ExportError(
            f"transformers' exporter could not export {type(model).__name__}: {first_line(error)}",
            "check that the architecture supports generation with a cache in this transformers",
        ) from error
    if set(exported.components) != {"prefill", "decode"}:
        raise ExportError(
            f"expected prefill and decode graphs, the exporter made {sorted(exported.components)}"
        )
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        exported.save_pretrained(str(work))
        prefill = _rename(work / PREFILL, "prefill")
        decode = _rename(work / DECODE, "decode")
        share_weights(work)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DecoderGraphs(
        folder=out,
        layers=int(model.config.num_hidden_layers),
        prefill_inputs=prefill,
        decode_inputs=decode,
    )
