"""Readers for evaluation and calibration text: JSONL, plain text, CSV and saved datasets.

Every reader yields the same :class:`Sample` records and fails with the file, the line and
what to change. Evaluation takes the first ``max_samples`` in file order; calibration draws its
samples with a seed (:func:`draw_samples`). Either way the same file gives the same data.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from collections.abc import Iterator
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


def _read_json(path: Path, text_field: str, label_field: str) -> Iterator[Sample]:
    """A .json file: one array of objects (or JSONL saved with a .json name)."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        yield from _read_jsonl(path, text_field, label_field)
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error.msg}, line {error.lineno})") from None
    for i, record in enumerate(records, start=1):
        yield _sample(record, f"{path} item {i}", text_field, label_field)


def _read_jsonl(path: Path, text_field: str, label_field: str) -> Iterator[Sample]:
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
            yield _sample(record, where, text_field, label_field)


def _read_text(path: Path) -> Iterator[Sample]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield Sample(line.strip())


def _read_csv(path: Path, text_field: str, label_field: str) -> Iterator[Sample]:
    with path.open(encoding="utf-8", newline="") as handle:
        # strict: a quote left open is an error, not one sample that swallows the rest of the
        # file.
        reader = csv.DictReader(handle, strict=True)
        try:
            if reader.fieldnames is None:
                return
            if text_field not in reader.fieldnames:
                raise InputError(
                    f"{path}: the header has no column {text_field!r} (columns: {', '.join(reader.fieldnames)})",
                    "set data.text_field in the recipe",
                )
            for row in reader:
                yield Sample(
                    _text_of(row[text_field], f"{path} line {reader.line_num}", text_field),
                    row.get(label_field),
                )
        except csv.Error as error:
            raise InputError(
                f"{path} is not valid CSV after line {reader.line_num} ({error})",
                "close the quote, or quote a field that holds the delimiter",
            ) from None


def _read_dataset(path: Path, text_field: str, label_field: str) -> Iterator[Sample]:
    """A Hugging Face dataset saved with ``save_to_disk`` (one split: its folder)."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "dataset_info.json").is_file())
        raise InputError(
            f"{path} holds a dataset with splits {splits}, not one split",
            f"point the recipe at one split's folder, e.g. {path / (splits[0] if splits else 'train')}",
        )
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"{path} is a Hugging Face dataset folder, and reading it needs the datasets package",
            "pip install 'tforge[datasets]', or export the text to JSONL",
        ) from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise InputError(f"{path} is not a dataset saved with save_to_disk ({error})") from None
    columns = list(dataset.column_names)
    if text_field not in columns:
        raise InputError(
            f"{path}: the dataset has no column {text_field!r} (columns: {', '.join(columns)})",
            "set data.text_field in the recipe",
        )
    labels = label_field in columns
    for number, row in enumerate(dataset, start=1):
        yield Sample(
            _text_of(row[text_field], f"{path} row {number}", text_field),
            row[label_field] if labels else None,
        )


def _samples(path: Path, kind: str, text_field: str, label_field: str) -> Iterator[Sample]:
    """Every sample of a file or dataset folder, in order; errors name the file and line."""
    help_ = f"set data.{kind} to a JSONL, .txt or .csv file, or a dataset folder"
    if not path.exists():
        raise InputError(f"{kind} file {path} does not exist", help_)
    if path.is_dir():
        if (
            not (path / "dataset_info.json").is_file()
            and not (path / "dataset_dict.json").is_file()
        ):
            raise InputError(f"{kind} path {path} is a folder but not a saved dataset", help_)
        yield from _read_dataset(path, text_field, label_field)
        return
    if not path.is_file():
        raise InputError(f"{kind} file {path} is not a file", help_)
    form = _SUFFIXES.get(path.suffix.lower())
    if form is None:
        raise InputError(
            f"{kind} file {path} has an unknown extension {path.suffix!r}",
            f"use one of {', '.join(_SUFFIXES)}, or a dataset folder",
        )
    try:
        if form == "jsonl":
            yield from _read_jsonl(path, text_field, label_field)
        elif form == "json":
            yield from _read_json(path, text_field, label_field)
        elif form == "csv":
            yield from _read_csv(path, text_field, label_field)
        else:
            yield from _read_text(path)
    except UnicodeDecodeError as error:
        raise InputError(
            f"{kind} file {path} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None


def read_samples(
    path: Path, *, kind: str, text_field: str = "text", label_field: str = "label", limit: int = 256
) -> list[Sample]:
    """The first ``limit`` samples of a JSONL, .json, .txt or .csv file or a dataset folder."""
    samples = list(itertools.islice(_samples(path, kind, text_field, label_field), limit))
    if not samples:
        raise InputError(f"{kind} file {path} is empty", "it needs at least one sample")
    return samples


def draw_samples(
    path: Path, *, kind: str, count: int, seed: int, text_field: str = "text"
) -> list[Sample]:
    """``count`` samples drawn uniformly from the whole file with a seeded generator.

    Reservoir sampling: one pass, memory for ``count`` samples only, and the same file and
    seed always give the same samples, returned in file order. Fewer than ``count`` samples in
    the file is an error: a calibration set quietly smaller than asked for changes the scales.
    """
    rng = random.Random(seed)
    chosen: list[tuple[int, Sample]] = []
    seen = 0
    for index, sample in enumerate(_samples(path, kind, text_field, "label")):
        seen += 1
        if len(chosen) < count:
            chosen.append((index, sample))
        else:
            slot = rng.randrange(index + 1)
            if slot < count:
                chosen[slot] = (index, sample)
    if seen < count:
        raise InputError(
            f"{kind} file {path} has {seen} samples; {count} are asked for",
            f"give more text, or lower the calibration sample count to at most {seen}"
            if seen
            else "it needs at least one sample",
        )
    return [sample for _, sample in sorted(chosen, key=lambda pair: pair[0])]
