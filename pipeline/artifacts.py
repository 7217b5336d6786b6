"""Artifacts, stage records and the content-addressed artifact store.

Layout under the artifacts root (``artifacts/`` by default)::

    cache/<key[:2]>/<key>/record.json    # StageRecord: what ran, on what, with what result
    cache/<key[:2]>/<key>/<outputs...>   # the files the stage wrote
    runs/<run-id>/                       # one build: manifest, reports, the models to ship

A stage's key is the sha256 of (stage name, config, input hashes, environment facets). A stage
writes into a temporary folder beside the cache; only a complete output is renamed into place,
so an interrupted or failed stage leaves nothing that a later build could mistake for a result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import InputError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".tforge"))


def sha256_path(path: Path) -> str:
    """The hash of a file, or of a folder: every file's relative path and content, in order."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in _files_under(path):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(sha256_file(file).encode() + b"\n")
    return digest.hexdigest()


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in _files_under(path))


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stage_key(
    stage: str, config: Mapping[str, Any], inputs: Mapping[str, str], environment: Mapping[str, Any]
) -> str:
    """Content address of a stage's result: the same four things always give the same key."""
    payload = {"stage": stage, "config": config, "inputs": dict(inputs), "environment": environment}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A file or folder with its content hash; stage outputs and build inputs alike."""

    name: str
    path: Path
    sha256: str
    size: int

    @classmethod
    def of(cls, name: str, path: Path) -> Artifact:
        return cls(name=name, path=path, sha256=sha256_path(path), size=size_of(path))


class OutputRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the stage's cache folder
    sha256: str
    size: int


class StageRecord(BaseModel):
    """What one stage did: the unit of caching and of the manifest."""

    model_config = ConfigDict(frozen=True)

    step: str  # e.g. "export", "verify[fp32]"
    stage: str  # e.g. "export", "verify"
    key: str
    config: dict[str, Any]
    inputs: dict[str, str]  # input name -> sha256
    outputs: dict[str, OutputRecord]
    stats: dict[str, Any]
    seconds: float
    cached: bool = False

    def as_cached(self, step: str) -> StageRecord:
        return self.model_copy(update={"cached": True, "step": step})


class ArtifactStore:
    """Stage results addressed by key, written atomically, checked on the way out."""

    RECORD = "record.json"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        self.runs = root / "runs"

    def ensure_writable(self) -> None:
        """Fail early, with the path, if the artifacts root cannot be written."""
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            self.runs.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".tforge-probe-"):
                pass
        except OSError as error:
            raise InputError(
                f"output folder {self.root} is not writable ({error.strerror or error})",
                "pass --artifacts DIR with a folder you can write to",
            ) from None

    def folder(self, key: str) -> Path:
        return self.cache / key[:2] / key

    def lookup(self, key: str, warn: bool = True) -> StageRecord | None:
        """The stored record for ``key`` if its outputs are complete and unchanged, else None;
        ``warn``: say why a stored entry is not used (once, where the build looks it up)."""
        folder = self.folder(key)
        record_path = folder / self.RECORD
        if not record_path.is_file():
            return None
        try:
            record = StageRecord.model_validate_json(record_path.read_text(encoding="utf-8"))
        except (OSError, ValidationError) as error:
            if warn:
                log.warning("cache entry %s is unreadable (%s); rebuilding it", key[:12], error)
            return None
        for name, output in record.outputs.items():
            path = folder / output.path
            if (
                not path.exists()
                or size_of(path) != output.size
                or sha256_path(path) != output.sha256
            ):
                if warn:
                    log.warning(
                        "cache entry %s: output %r changed on disk; rebuilding it", key[:12], name
                    )
                return None
        return record

    def output_path(self, record: StageRecord, name: str) -> Path:
        return self.folder(record.key) / record.outputs[name].path

    def artifacts(self, record: StageRecord) -> dict[str, Artifact]:
        return {
            name: Artifact(name, self.folder(record.key) / out.path, out.sha256, out.size)
            for name, out in record.outputs.items()
        }

    @contextlib.contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        """A fresh temporary folder for a stage to write into; removed unless committed."""
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(key[:12]), dir=self.cache))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(
        self, tmp: Path, record: StageRecord, outputs: dict[str, str], replace: bool = False
    ) -> StageRecord:
        """Hash ``outputs`` (name -> path in ``tmp``), write the record, move it all into place.

        ``replace``: a result re-taken on purpose (a re-measured latency) replaces the stored
        one; otherwise an entry already there is kept (same key, same result).
        """
        hashed = {}
        for name, relative in outputs.items():
            path = tmp / relative
            if not path.exists():
                raise RuntimeError(
                    f"stage {record.stage} declared output {name!r} but did not write {relative}"
                )
            hashed[name] = OutputRecord(path=relative, sha256=sha256_path(path), size=size_of(path))
        record = record.model_copy(update={"outputs": hashed})
        (tmp / self.RECORD).write_text(record.model_dump_json(indent=2), encoding="utf-8")
        final = self.folder(record.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and (replace or self.lookup(record.key, warn=False) is None):
            # A damaged entry, or one being re-taken: moved aside in one rename, then removed,
            # so a reader never sees half an entry.
            old = final.with_name(f"{temp_prefix(final.name)}old")
            with contextlib.suppress(FileNotFoundError):
                os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another build committed the same key first (same key: same result). Keep theirs.
            existing = self.lookup(record.key)
            if existing is None:
                raise
            return existing.model_copy(update={"seconds": record.seconds, "step": record.step})
        return record

    def remove_stale_temporaries(self) -> list[Path]:
        """Temporary folders of builds that died (their process is gone): never results, removed."""
        removed = []
        for parent in (self.cache, self.runs):
            if not parent.is_dir():
                continue
            for path in parent.glob(".tmp-*"):
                pid = _pid_of(path.name)
                if pid is not None and not _alive(pid):
                    if path.is_symlink() or path.is_file():
                        path.unlink(missing_ok=True)
                    else:
                        shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed


def temp_prefix(label: str) -> str:
    """Temporary names carry the owner's pid, so a later build can tell a dead one's leftovers."""
    return f".tmp-{os.getpid()}-{label}-"


def _pid_of(name: str) -> int | None:
    parts = name.split("-")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: ONNX external-data files: copied, never linked. ``onnx.load`` refuses to read weights
#: through a hard link or a symbolic link (a guard against link attacks), so a linked data file
#: would leave both the run's model and the cached one unloadable by onnx.
COPIED_SUFFIXES = (".data", ".onnx_data")


def link_or_copy(source: Path, target: Path) -> None:
    """Place a cached file or folder into a run folder without duplicating bytes when possible."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for file in _files_under(source):
            link_or_copy(file, target / file.relative_to(source))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.name.endswith(COPIED_SUFFIXES):
        shutil.copy2(source, target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file beside it, renamed over it."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: a temporary file beside it, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; reports are for sharing
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
