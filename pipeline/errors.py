"""One exception tree for everything tforge reports to a user.

The CLI turns a :class:`TforgeError` into one line (what is wrong, what to do) and an exit
code; anything else is a bug in tforge and keeps its traceback.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line, without terminal colour codes: for one-line errors."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]


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
