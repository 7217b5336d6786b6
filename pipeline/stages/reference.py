"""Stage ``reference``: PyTorch FP32 outputs on the evaluation data, recorded once per build.

The evaluation texts are tokenised into batches, padded to the longest text of each batch, once
per padding side (right, and left: left padding moves every real token, so the attention mask
and position handling are exercised). The token arrays and PyTorch's outputs are stored
together, so every later check feeds exactly the same inputs and never re-tokenises.

Output: ``reference/`` with ``reference.safetensors`` (arrays keyed ``<side>/<batch>/<name>``)
and ``reference.json`` (the index: batches, rows, labels).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import Artifact
from pipeline.backends.torch_backend import TorchRunner, task_module
from pipeline.calibration import Sample, read_samples
from pipeline.errors import InputError
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.load import CheckpointInfo, loaded_model

ARRAYS = "reference.safetensors"
INDEX = "reference.json"


class ReferenceConfig(StageConfig):
    batch_size: int
    padding: tuple[str, ...]
    max_length: int
    max_samples: int
    text_field: str
    label_field: str
    #: PyTorch's intra-op threads: set explicitly, so the recorded outputs never depend on
    #: whatever an earlier stage of the same process set.
    threads: int


@dataclass(frozen=True)
class Batch:
    side: str
    key: str
    rows: list[int]  # sample indices
    feed: dict[str, np.ndarray]
    mask: np.ndarray
    output: np.ndarray
    word_ids: list[list[int | None]] | None


class ReferenceData:
    """The stored reference: batches with their feeds and PyTorch's output, read lazily."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.index: dict[str, Any] = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        # One batch at a time: a large model's outputs on the whole set can exceed memory.
        self._file = safe_open(str(folder / ARRAYS), framework="numpy")

    @classmethod
    def of(cls, artifact: Artifact) -> ReferenceData:
        return cls(artifact.path)

    @property
    def sides(self) -> list[str]:
        return list(self.index["sides"])

    @property
    def labels(self) -> list[Any] | None:
        labels: list[Any] | None = self.index.get("labels")
        return labels

    def batches(self, side: str) -> Iterator[Batch]:
        get = self._file.get_tensor
        for entry in self.index["sides"][side]:
            key = entry["key"]
            yield Batch(
                side=side,
                key=key,
                rows=entry["rows"],
                feed={name: get(f"{key}/{name}") for name in self.index["inputs"]},
                mask=get(f"{key}/attention_mask"),
                output=get(f"{key}/output"),
                word_ids=entry.get("word_ids"),
            )


def _labels(samples: list[Sample], info: CheckpointInfo, source: Path) -> list[Any] | None:
    """Labels as model label ids, when every sample has one; None when none has."""
    present = [s.label is not None for s in samples]
    if not any(present) or info.task == "feature-extraction":
        return None
    if not all(present):
        raise InputError(
            f"{source}: {sum(present)} of {len(samples)} samples have a label",
            "label every sample, or none (then only agreement with PyTorch is measured)",
        )
    label2id = info.labels or {}
    count = info.num_labels

    def to_id(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise InputError(f"{source}: {where}: label {value!r} is not an int or a label name")
        # A label name first: "2" may be a name that maps to id 1 (star ratings, CSV files).
        if isinstance(value, str) and value in label2id:
            return label2id[value]
        if isinstance(value, str) and not value.isdigit():
            raise InputError(
                f"{source}: {where}: label {value!r} is not one of the model's labels {sorted(label2id)}"
            )
        ident = int(value)
        if count is not None and not 0 <= ident < count:
            raise InputError(
                f"{source}: {where}: label id {ident} is out of range (the model has {count} labels)"
            )
        return ident

    if info.task == "token-classification" and not info.tokenizer.get("fast"):
        raise InputError(
            f"{source}: per-word labels need a fast tokenizer (tokenizer.json) to map words to tokens",
            "save the tokenizer with a fast tokenizer class, or drop the labels",
        )
    out: list[Any] = []
    for number, sample in enumerate(samples, start=1):
        if info.task == "token-classification":
            if not isinstance(sample.label, list):
                raise InputError(
                    f"{source}: sample {number}: token-classification labels must be a list, one per word"
                )
            words = sample.text.split()
            if len(sample.label) != len(words):
                raise InputError(
                    f"{source}: sample {number} has {len(sample.label)} labels for {len(words)} words",
                    "give one label per whitespace-separated word",
                )
            out.append([to_id(v, f"sample {number}") for v in sample.label])
        else:
            out.append(to_id(sample.label, f"sample {number}"))
    return out


class ReferenceStage(Stage[ReferenceConfig]):
    name = "reference"
    # PyTorch's CPU kernels differ by instruction set (AVX2, AVX-512, AMX): so do the last bits.
    facets = ("versions", "hardware")
    version = 2  # 2: explicit thread count

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        from safetensors.numpy import save_file

        cfg = self.config
        info = CheckpointInfo.read(inputs["info"])
        source = inputs["evaluation"].path
        samples = read_samples(
            source,
            kind="evaluation",
            text_field=cfg.text_field,
            label_field=cfg.label_field,
            limit=cfg.max_samples,
        )
        labels = _labels(samples, info, source)
        loaded = loaded_model(ctx, inputs["checkpoint"].path, info.task)
        tokenizer = loaded.tokenizer
        runner = TorchRunner(
            task_module(loaded.model, info.task, tuple(info.inputs)), info.output, cfg.threads
        )
        max_length = min(cfg.max_length, info.max_length or cfg.max_length)
        # Word mode (pre-split words, for per-word labels) uses the fast tokenizer's word_ids().
        words = info.task == "token-classification" and labels is not None
        texts: list[Any] = [s.text.split() for s in samples] if words else [s.text for s in samples]
        lengths = [len(ids) for ids in tokenizer(texts, is_split_into_words=words)["input_ids"]]
        truncated = sum(n > max_length for n in lengths)

        arrays: dict[str, np.ndarray] = {}
        sides: dict[str, list[dict[str, Any]]] = {}
        starts = range(0, len(texts), cfg.batch_size)
        original_side = tokenizer.padding_side
        try:
            with ctx.progress.task(
                "PyTorch reference outputs", total=len(cfg.padding) * len(starts)
            ) as advance:
                for side in cfg.padding:
                    tokenizer.padding_side = side
                    sides[side] = []
                    for number, start in enumerate(starts):
                        rows = list(range(start, min(start + cfg.batch_size, len(texts))))
                        encoded = tokenizer(
                            [texts[r] for r in rows],
                            padding="longest",
                            truncation=True,
                            max_length=max_length,
                            is_split_into_words=words,
                            return_tensors="np",
                        )
                        key = f"{side}/{number:04d}"
                        feed = {name: encoded[name].astype(np.int64) for name in info.inputs}
                        for name, array in feed.items():
                            arrays[f"{key}/{name}"] = array
                        arrays[f"{key}/attention_mask"] = encoded["attention_mask"].astype(np.int64)
                        arrays[f"{key}/output"] = runner.run(feed)[info.output]
                        entry: dict[str, Any] = {"key": key, "rows": rows}
                        if words:
                            entry["word_ids"] = [encoded.word_ids(i) for i in range(len(rows))]
                        sides[side].append(entry)
                        advance(1)
        finally:
            tokenizer.padding_side = original_side
        folder = out / "reference"
        folder.mkdir()
        save_file(arrays, str(folder / ARRAYS))
        index = {
            "task": info.task,
            "inputs": info.inputs,
            "output": info.output,
            "pooling": info.pooling,
            "samples": len(samples),
            "max_length": max_length,
            "labels": labels,
            "sides": sides,
        }
        (folder / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
        return StageResult(
            outputs={"reference": "reference"},
            stats={
                "samples": len(samples),
                "batches": sum(len(v) for v in sides.values()),
                "padding": list(cfg.padding),
                "max_length": max_length,
                "truncated": truncated,
                "labelled": labels is not None,
            },
        )
