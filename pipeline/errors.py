"""One exception tree for everything tforge reports to a user.

The CLI turns a :class:`TforgeError` into one line (what is wrong, what to do) and an exit
code; anything else is a bug in tforge and keeps its traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line, without terminal colour codes: for one-line errors."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]


def read_json(text: str, origin: str) -> object:
    """``text`` parsed as JSON; InputError naming ``origin`` and where the JSON breaks."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{origin} is not JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None


def read_text(path: Path, what: str, hint: str | None = None) -> str:
    """A UTF-8 text file's contents; InputError for one that cannot be read or is not text
    (an .onnx file passed where ``what`` was expected), with ``hint`` for the latter."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text file, so not {what}", hint) from None
    except OSError as error:
        raise InputError(f"cannot read {path} ({error.strerror or error})") from None


class TforgeError(Exception):
    """Base class: a problem tforge can explain in one line."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class RecipeError(TforgeError):
    """The recipe (or the options standing in for it) is invalid."""

    exit_code = 2


class InputError(TforgeError):
    """A model folder, data file or output folder the user pointed at is unusable."""


class ExportError(TforgeError):
    """The exporter could not turn the model into ONNX."""


class PreconditionError(TforgeError):
    """A graph pass or stage was given an input it cannot work on."""


class TargetUnavailable(TforgeError):
    """A target (ORT CUDA, TensorRT) needs a package or device that is not present."""


class GateFailed(TforgeError):
    """The build ran, but a gate in the recipe failed: the model got worse or slower."""

    exit_code = 3


class PassError(TforgeError):
    """A graph pass failed on a graph it accepted."""
