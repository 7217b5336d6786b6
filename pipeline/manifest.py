"""The manifest of one build: ``runs/<run-id>/manifest.json``.

It records the resolved recipe, the hash of every input, every stage (key, cached or not,
seconds, input and output hashes, figures), every check with its limit, and where the build ran.
Reports are pure functions of it, so ``tforge report`` can re-render them at any time and the
same inputs and versions give the same hashes in it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.artifacts import StageRecord
from pipeline.errors import InputError, read_json

SCHEMA_VERSION = 1


class InputRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    path: str
    sha256: str
    size: int


class Check(BaseModel):
    """One comparison of a figure with a limit; truthy when it passed.

    ``str()`` says what was measured, the limit, and on failure the limit that would have
    passed, so a user can tell a near miss from a broken model at a glance.
    """

    model_config = ConfigDict(frozen=True)

    source: Literal["tolerance", "gate", "fusion", "budget"]
    variant: str
    metric: str
    shape: str | None = None
    value: float | None
    limit: float
    kind: Literal["min", "max"]
    passed: bool
    note: str | None = None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def label(self) -> str:
        return f"{self.variant} {self.metric}" + (f" @{self.shape}" if self.shape else "")

    def __str__(self) -> str:
        op = ">=" if self.kind == "min" else "<="
        if self.value is None:
            return f"{self.label}: not measured ({self.note or 'no figure'}), limit {op} {self.limit:.6g}: FAILED"
        value = f"{self.value:.6g}" if self.passed else _apart(self.value, self.limit)
        status = "ok" if self.passed else f"FAILED (would pass with {op} {value})"
        return f"{self.label} = {value}, limit {op} {self.limit:.6g}: {status}"


def _apart(value: float, limit: float) -> str:
    """``value`` with 6 significant digits, or as many more as it takes to read differently
    from ``limit``: 0.99899 against 0.999 is not printed as "0.999 ... FAILED"."""
    for digits in range(6, 18):
        text = f"{value:.{digits}g}"
        if value == limit or text != f"{limit:.{digits}g}":
            return text
    return repr(value)


def check(
    source: Literal["tolerance", "gate", "fusion", "budget"],
    variant: str,
    metric: str,
    value: float | None,
    limit: float,
    kind: Literal["min", "max"],
    shape: str | None = None,
    note: str | None = None,
) -> Check:
    passed = value is not None and (value >= limit if kind == "min" else value <= limit)
    return Check(
        source=source,
        variant=variant,
        metric=metric,
        shape=shape,
        value=value,
        limit=limit,
        kind=kind,
        passed=passed,
        note=note,
    )


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    tforge_version: str
    run_id: str
    created: str
    recipe: dict[str, Any]
    recipe_sha256: str
    inputs: list[InputRecord]
    stages: list[StageRecord]
    #: Variant name -> the step whose "model" output is that variant's model.
    variant_models: dict[str, str]
    checks: list[Check]
    environment: dict[str, Any]
    build: dict[str, Any]

    def stage(self, step: str) -> StageRecord | None:
        return next((s for s in self.stages if s.step == step), None)

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @classmethod
    def parse(cls, text: str, origin: str) -> Manifest:
        data = read_json(text, origin)
        if isinstance(data, dict) and "contenders" in data and "recipe" not in data:
            raise InputError(
                f"{origin} is a report.json, not a manifest",
                "pass the run folder or its manifest.json (reports are rendered from it)",
            )
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise InputError(
                f"{origin} has manifest schema version {version!r}; this tforge reads version {SCHEMA_VERSION}",
                "re-run the build with this tforge version",
            )
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise InputError(
                f"{origin} is not a tforge manifest ({error.error_count()} problems, first: {error.errors()[0]['msg']})"
            ) from None
