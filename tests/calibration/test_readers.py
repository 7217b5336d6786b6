import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.calibration import draw_samples, read_samples, shipped_data
from pipeline.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def test_jsonl_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b", "label": 1}\n\n{"text": "c", "label": "L0"}\n')
    samples = read_samples(path, kind="evaluation")
    assert [(s.text, s.label) for s in samples] == [("a b", 1), ("c", "L0")]


def test_limit_takes_the_first_samples(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(10)))
    assert [s.text for s in read_samples(path, kind="evaluation", limit=3)] == ["t0", "t1", "t2"]


def test_json_array_and_jsonl_named_json(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two", "label": 1}]))
    assert [(s.text, s.label) for s in read_samples(tmp_path / "a.json", kind="evaluation")] == [
        ("one", None),
        ("two", 1),
    ]
    (tmp_path / "b.json").write_text('{"text": "x"}\n{"text": "y"}\n')
    assert [s.text for s in read_samples(tmp_path / "b.json", kind="evaluation")] == ["x", "y"]


def test_text_and_csv(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    assert [s.text for s in read_samples(tmp_path / "d.txt", kind="calibration")] == ["one", "two"]
    (tmp_path / "d.csv").write_text('sentence,label\n"hi, there",2\n')
    samples = read_samples(tmp_path / "d.csv", kind="evaluation", text_field="sentence")
    assert (samples[0].text, samples[0].label) == ("hi, there", "2")


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.jsonl", "", "is empty"),
        ("blank.jsonl", "\n\n", "is empty"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "line 2 is not JSON"),
        ("list.jsonl", '["text"]\n', "line 1 is a JSON list, not an object"),
        ("field.jsonl", '{"sentence": "x"}\n', "line 1 has no field 'text' (fields: 'sentence')"),
        ("type.jsonl", '{"text": 3}\n', "field 'text' is int, not text"),
        ("blanktext.jsonl", '{"text": "  "}\n', "field 'text' is empty"),
        ("cols.csv", "a,b\n1,2\n", "no column 'text' (columns: a, b)"),
        (
            "quote.csv",
            'text\nfine\n"open\nrest of the file\n',
            "is not valid CSV after line 2 (unexpected end of data)",
        ),
        ("blankcsv.csv", 'text\nfine\n""\n', "line 3: field 'text' is empty"),
        ("data.parquet", "x", "unknown extension '.parquet'"),
    ],
)
def test_bad_files_say_what_is_wrong(
    tmp_path: Path, name: str, content: str, fragment: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError) as caught:
        read_samples(path, kind="evaluation")
    assert fragment in caught.value.message


def test_missing_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_samples(tmp_path / "nope.jsonl", kind="evaluation")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_samples(tmp_path / "latin.txt", kind="evaluation")


def test_saved_dataset_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    table = {"sentence": ["one text", "two texts", "three"], "label": [0, 1, 0]}
    dataset = datasets.Dataset.from_dict(table)
    dataset.save_to_disk(str(tmp_path / "ds"))
    samples = read_samples(tmp_path / "ds", kind="evaluation", text_field="sentence")
    assert [(s.text, s.label) for s in samples] == list(
        zip(table["sentence"], table["label"], strict=True)
    )
    with pytest.raises(InputError, match="no column 'text' \\(columns: sentence, label\\)"):
        read_samples(tmp_path / "ds", kind="calibration")
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="splits \\['train'\\]") as caught:
        read_samples(tmp_path / "dd", kind="calibration", text_field="sentence")
    assert str(tmp_path / "dd" / "train") in (caught.value.hint or "")
    assert (
        len(read_samples(tmp_path / "dd" / "train", kind="calibration", text_field="sentence")) == 3
    )
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="is a folder but not a saved dataset"):
        read_samples(tmp_path / "plain", kind="calibration")


def test_draw_is_seeded_uniform_and_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("".join(f"text {i}\n" for i in range(1000)))
    first = [s.text for s in draw_samples(path, kind="calibration", count=50, seed=3)]
    assert first == [s.text for s in draw_samples(path, kind="calibration", count=50, seed=3)]
    assert first != [s.text for s in draw_samples(path, kind="calibration", count=50, seed=4)]
    indices = [int(t.split()[1]) for t in first]
    assert indices == sorted(indices) and len(set(indices)) == 50
    assert max(indices) > 500  # drawn from the whole file, not its head
    everything = draw_samples(path, kind="calibration", count=1000, seed=0)
    assert [s.text for s in everything] == [f"text {i}" for i in range(1000)]


def test_draw_says_when_the_file_is_too_short(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(InputError, match="has 2 samples; 8 are asked for") as caught:
        draw_samples(path, kind="calibration", count=8, seed=0)
    assert "at most 2" in (caught.value.hint or "")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(InputError, match="has 0 samples"):
        draw_samples(tmp_path / "e.txt", kind="calibration", count=8, seed=0)


def test_shipped_sets_are_disjoint_and_sized() -> None:
    evaluation = [
        s.text for s in read_samples(shipped_data("evaluation"), kind="evaluation", limit=10_000)
    ]
    calibration = [
        s.text for s in read_samples(shipped_data("calibration"), kind="calibration", limit=10_000)
    ]
    assert len(evaluation) == 256
    assert len(calibration) == 512
    assert not set(map(str.lower, evaluation)) & set(map(str.lower, calibration))
    assert len(set(map(str.lower, evaluation))) == len(evaluation)


def test_shipped_sets_rebuild_byte_for_byte() -> None:
    provenance = json.loads((ROOT / "calibration" / "PROVENANCE.json").read_text())
    if provenance["python_version"] != platform.python_version():
        pytest.skip(
            f"the sets were built with Python {provenance['python_version']}; docstrings differ in {platform.python_version()}"
        )
    result = subprocess.run(
        [sys.executable, str(ROOT / "calibration" / "build_data.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
