"""Progress hooks: the build reports what it does; the CLI decides how (or whether) to show it.

The runner calls these around every step; a stage with a long inner loop asks for a task and
advances it. Nothing here prints: :class:`NullProgress` discards everything, and the CLI's
rich implementation draws bars on a terminal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

from pipeline.artifacts import StageRecord


class Progress(Protocol):
    def step_started(self, index: int, total: int, step: str) -> None: ...

    def step_finished(self, record: StageRecord) -> None: ...

    def task(
        self, description: str, total: int
    ) -> contextlib.AbstractContextManager[Callable[[int], None]]: ...


class NullProgress:
    def step_started(self, index: int, total: int, step: str) -> None:
        pass

    def step_finished(self, record: StageRecord) -> None:
        pass

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        def advance(n: int = 1) -> None:
            pass

        yield advance
