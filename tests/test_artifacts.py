import json
import os
from pathlib import Path

import pytest

from pipeline.artifacts import (
    Artifact,
    ArtifactStore,
    StageRecord,
    link_or_copy,
    sha256_path,
    stage_key,
    write_text_atomic,
)
from pipeline.errors import InputError


def record(key: str) -> StageRecord:
    """A stage record before commit: ``commit`` hashes the outputs and fills them in."""
    return StageRecord(
        step="s",
        stage="s",
        key=key,
        config={},
        inputs={},
        outputs={},
        stats={"n": 1},
        seconds=0.1,
    )


def test_stage_key_is_stable_and_sensitive_to_each_part() -> None:
    base = stage_key("export", {"opset": 20}, {"checkpoint": "aa"}, {"versions": {"torch": "1"}})
    assert base == stage_key(
        "export", {"opset": 20}, {"checkpoint": "aa"}, {"versions": {"torch": "1"}}
    )
    assert (
        len(
            {
                base,
                stage_key(
                    "verify", {"opset": 20}, {"checkpoint": "aa"}, {"versions": {"torch": "1"}}
                ),
                stage_key(
                    "export", {"opset": 21}, {"checkpoint": "aa"}, {"versions": {"torch": "1"}}
                ),
                stage_key(
                    "export", {"opset": 20}, {"checkpoint": "ab"}, {"versions": {"torch": "1"}}
                ),
                stage_key(
                    "export", {"opset": 20}, {"checkpoint": "aa"}, {"versions": {"torch": "2"}}
                ),
            }
        )
        == 5
    )


def test_folder_hash_covers_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("1")
    first = sha256_path(tmp_path / "a")
    (tmp_path / "a" / "x.txt").write_text("2")
    second = sha256_path(tmp_path / "a")
    (tmp_path / "a" / "x.txt").rename(tmp_path / "a" / "y.txt")
    assert len({first, second, sha256_path(tmp_path / "a")}) == 3


def test_commit_then_lookup_returns_the_record(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with store.writing("k" * 64) as tmp:
        (tmp / "out.txt").write_text("hello")
        committed = store.commit(tmp, record("k" * 64), {"out": "out.txt"})
    found = store.lookup("k" * 64)
    assert found == committed
    assert found.outputs["out"].size == 5
    assert store.artifacts(found)["out"].path.read_text() == "hello"
    assert not [p for p in store.cache.iterdir() if p.name.startswith(".tmp-")]


def test_a_failing_stage_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError), store.writing("f" * 64) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("stage crashed")
    assert store.lookup("f" * 64) is None
    assert list(store.cache.iterdir()) == []


def test_changed_output_invalidates_the_entry(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with store.writing("c" * 64) as tmp:
        (tmp / "out.txt").write_text("hello")
        committed = store.commit(tmp, record("c" * 64), {"out": "out.txt"})
    store.output_path(committed, "out").write_text("jello")
    assert store.lookup("c" * 64) is None


def test_a_changed_entry_is_reported_once_when_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The build's lookup says why it rebuilds; the commit that replaces the entry is silent."""
    store = ArtifactStore(tmp_path)
    key = "d" * 64

    def commit() -> StageRecord:
        with store.writing(key) as tmp:
            (tmp / "out.txt").write_text("hello")
            return store.commit(tmp, record(key), {"out": "out.txt"})

    store.output_path(commit(), "out").write_text("jello")
    caplog.set_level("WARNING")
    assert store.lookup(key) is None
    commit()
    assert ["changed on disk" in r.message for r in caplog.records] == [True]
    assert store.lookup(key) is not None


def test_corrupt_record_is_a_miss(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    folder = store.folder("d" * 64)
    folder.mkdir(parents=True)
    (folder / "record.json").write_text("{not json")
    assert store.lookup("d" * 64) is None


def test_missing_declared_output_is_a_bug_not_a_result(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError, match="did not write"), store.writing("e" * 64) as tmp:
        store.commit(tmp, record("e" * 64), {"out": "missing.txt"})
    assert store.lookup("e" * 64) is None


def test_unwritable_root_is_an_input_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="not writable"):
        ArtifactStore(blocker / "artifacts").ensure_writable()


def test_link_or_copy_places_a_folder(tmp_path: Path) -> None:
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "f.txt").write_text("data")
    link_or_copy(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst" / "sub" / "f.txt").read_text() == "data"
    assert Artifact.of("x", tmp_path / "dst").sha256 == Artifact.of("x", tmp_path / "src").sha256


def test_write_text_atomic_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "r" / "report.json"
    write_text_atomic(path, json.dumps({"a": 1}))
    write_text_atomic(path, json.dumps({"a": 2}))
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
    assert path.stat().st_mode & 0o044 == 0o044 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_second_commit_of_the_same_key_keeps_the_first(tmp_path: Path) -> None:
    """Two builds racing on one key: same key, same result; the loser's copy is dropped."""
    store = ArtifactStore(tmp_path)
    with store.writing("r" * 64) as tmp:
        (tmp / "out.txt").write_text("first")
        store.commit(tmp, record("r" * 64), {"out": "out.txt"})
    with store.writing("r" * 64) as tmp:
        (tmp / "out.txt").write_text("first")
        again = store.commit(tmp, record("r" * 64), {"out": "out.txt"})
    assert store.lookup("r" * 64) == again.model_copy(update={"seconds": 0.1})
    assert not [p for p in store.cache.iterdir() if p.name.startswith(".tmp-")]


def test_stale_temporaries_of_dead_builds_are_removed(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.ensure_writable()
    dead = store.cache / ".tmp-999999999-abc-x"
    mine = store.runs / f".tmp-{os.getpid()}-run-y"
    dead.mkdir()
    mine.mkdir()
    assert store.remove_stale_temporaries() == [dead]
    assert not dead.exists() and mine.exists()
