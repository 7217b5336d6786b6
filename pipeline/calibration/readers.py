"""Readers for evaluation and calibration text: JSONL, plain text and CSV.

Every reader returns the same :class:`Sample` records and fails with the file, the line and
what to change. Samples are taken in file order (the first ``max_samples``), so the same file
always gives the same data.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

#: The data sets shipped with the project (built by calibration/build_data.py).
_SHIPPED = Path(__file__).resolve().parents[2] / "calibration"
_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".txt": "text", ".csv": "csv"}


@dataclass(frozen=True)
class Sample:
    text: str
    #: Class label (sequence-classification) or per-word labels (token-classification).
    label: Any = None


def shipped_data(kind: str) -> Path:
    """The path of the shipped ``evaluation`` or ``calibration`` set."""
    path = _SHIPPED / f"{kind}.jsonl"
    if not path.is_file():
        raise InputError(
            f"the shipped {kind} set is not at {path} (tforge installed without its source tree?)",
            f"set data.{kind} in the recipe to a JSONL file with a 'text' field",
        )
    return path


def _text_of(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise InputError(
            f"{where}: field {field!r} is {type(value).__name__}, not text",
            "each sample needs a string",
        )
    if not value.strip():
        raise InputError(f"{where}: field {field!r} is empty", "remove the line or give it text")
    return value


def _sample(record: Any, where: str, text_field: str, label_field: str) -> Sample:
    if not isinstance(record, dict):
        raise InputError(
            f"{where} is a JSON {type(record).__name__}, not an object",
            'write {"text": "..."} per sample',
        )
    if text_field not in record:
        fields = ", ".join(map(repr, record)) or "none"
        raise InputError(
            f"{where} has no field {text_field!r} (fields: {fields})",
            "set data.text_field in the recipe",
        )
    return Sample(_text_of(record[text_field], where, text_field), record.get(label_field))


def _read_json(path: Path, text_field: str, label_field: str, limit: int) -> list[Sample]:
    """A .json file: one array of objects (or JSONL saved with a .json name)."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _read_jsonl(path, text_field, label_field, limit)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error.msg}, line {error.lineno})") from None
    return [
        _sample(r, f"{path} item {i}", text_field, label_field)
        for i, r in enumerate(records[:limit], start=1)
    ]


def _read_jsonl(path: Path, text_field: str, label_field: str, limit: int) -> list[Sample]:
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{where} is not JSON ({error.msg})",
                    "the file must be JSONL: one JSON object per line",
                ) from None
            samples.append(_sample(record, where, text_field, label_field))
            if len(samples) >= limit:
                break
    return samples


def _read_text(path: Path, limit: int) -> list[Sample]:
    samples = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                samples.append(Sample(line.strip()))
                if len(samples) >= limit:
                    break
    return samples


def _read_csv(path: Path, text_field: str, label_field: str, limit: int) -> list[Sample]:
    samples: list[Sample] = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return samples
        if text_field not in reader.fieldnames:
            raise InputError(
                f"{path}: the header has no column {text_field!r} (columns: {', '.join(reader.fieldnames)})",
                "set data.text_field in the recipe",
            )
        for number, row in enumerate(reader, start=2):
            samples.append(
                Sample(
                    _text_of(row[text_field], f"{path} line {number}", text_field),
                    row.get(label_field),
                )
            )
            if len(samples) >= limit:
                break
    return samples


def read_samples(
    path: Path, *, kind: str, text_field: str = "text", label_field: str = "label", limit: int = 256
) -> list[Sample]:
    """Read up to ``limit`` samples from a JSONL, .txt or .csv file."""
    if not path.exists():
        raise InputError(
            f"{kind} file {path} does not exist", f"set data.{kind} to a JSONL, .txt or .csv file"
        )
    if not path.is_file():
        raise InputError(
            f"{kind} file {path} is not a file", f"set data.{kind} to a JSONL, .txt or .csv file"
        )
    form = _SUFFIXES.get(path.suffix.lower())
    if form is None:
        raise InputError(
            f"{kind} file {path} has an unknown extension {path.suffix!r}",
            f"use one of {', '.join(_SUFFIXES)}",
        )
    try:
        if form == "jsonl":
            samples = _read_jsonl(path, text_field, label_field, limit)
        elif form == "json":
            samples = _read_json(path, text_field, label_field, limit)
        elif form == "csv":
            samples = _read_csv(path, text_field, label_field, limit)
        else:
            samples = _read_text(path, limit)
    except UnicodeDecodeError as error:
        raise InputError(
            f"{kind} file {path} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    if not samples:
        raise InputError(f"{kind} file {path} is empty", "it needs at least one sample")
    return samples
