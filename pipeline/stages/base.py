"""The stage contract: artifacts in, artifacts out, into a folder the store owns.

A stage declares its name, a frozen config (part of its cache key) and which environment facets
its result depends on. ``run`` writes only into ``out`` and returns the relative paths of what
it wrote plus a dict of figures (stats) for the manifest and the report. Timing, caching,
logging and progress happen around stages, in the runner, never inside them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from pipeline.artifacts import Artifact
from pipeline.progress import NullProgress, Progress


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ConfigT = TypeVar("ConfigT", bound=StageConfig)


@dataclass(frozen=True)
class StageResult:
    #: Output name -> path relative to the stage's folder (a file or a folder).
    outputs: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildContext:
    """What stages share within one build: progress, and objects too costly to load twice."""

    progress: Progress = field(default_factory=NullProgress)
    #: The artifact store's root, for state kept across builds that is not a stage result
    #: (TensorRT's timing cache); None outside a build.
    artifacts_root: Path | None = None
    _memo: dict[tuple[str, str], Any] = field(default_factory=dict)

    def has_memo(self, kind: str, key: str) -> bool:
        return (kind, key) in self._memo

    def memo(self, kind: str, key: str, factory: Callable[[], Any]) -> Any:
        """``factory()`` once per (kind, key) per build, e.g. the PyTorch model of a checkpoint."""
        slot = (kind, key)
        if slot not in self._memo:
            self._memo[slot] = factory()
        return self._memo[slot]


class Stage(ABC, Generic[ConfigT]):
    name: ClassVar[str]
    #: Environment parts the result depends on (see pipeline.environment.facets).
    facets: ClassVar[tuple[str, ...]] = ("versions",)
    #: Bumped when the stage's output changes for the same inputs and config; part of the key.
    version: ClassVar[int] = 1

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    def key_config(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def key_facets(self) -> tuple[str, ...]:
        """The environment facets of this step's key (a stage may widen them per config)."""
        return self.facets

    def requires(self, inputs: Mapping[str, Artifact]) -> None:
        """Check preconditions on the inputs; raise PreconditionError naming the fix."""

    @abstractmethod
    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult: ...

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Step:
    """A stage placed in a pipeline: its id and where each input comes from.

    Input references are ``"<step id>.<output name>"`` or ``"input:<name>"`` for the build's
    own inputs (the checkpoint folder, the data files).
    """

    id: str
    stage: Stage[Any]
    inputs: dict[str, str]
