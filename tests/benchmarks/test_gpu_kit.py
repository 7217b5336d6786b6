"""The GPU session kit: packed here, received part by part and installed on the CUDA machine.

A GPU session has a few minutes of device time; a part lost to a fresh machine, or sent twice or
out of order, must be caught with the part to send next, not found after the install.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import benchmarks.gpu_kit as gpu_kit
from benchmarks.gpu_kit import KitError, install, pack_folder, receive


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel that pip installs: one module, its metadata and RECORD."""
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{name}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        ),
        f"{name}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for inner, text in files.items():
            archive.writestr(inner, text)
    return path


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    payload = tmp_path / "payload"
    (payload / "wheels").mkdir(parents=True)
    _wheel(payload / "wheels", "tforgekitprobe", "0.1")
    # Installed here at another version: the kit's is installed over it (the kit pins).
    _wheel(payload / "wheels", "pytest", "0.0.1")
    # Installed here at the kit's version: the machine's own copy is kept.
    _wheel(payload / "wheels", "pyyaml", importlib.metadata.version("pyyaml"))
    (payload / "model").mkdir()
    (payload / "model" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    out = tmp_path / "kit"
    pack_folder(payload, out, part_bytes=4096)
    return out


def _carry(kit: Path, into: Path, *names: str) -> Path:
    """What one call carries to the machine: kit.json and the named parts."""
    if into.exists():
        for old in into.iterdir():
            old.unlink()
    into.mkdir(exist_ok=True)
    (into / "kit.json").write_bytes((kit / "kit.json").read_bytes())
    for name in names:
        (into / name).write_bytes((kit / name).read_bytes())
    return into


def test_parts_received_in_order_rebuild_the_bundle_and_install(kit: Path, tmp_path: Path) -> None:
    manifest = json.loads((kit / "kit.json").read_text())
    names = [part["name"] for part in manifest["parts"]]
    assert len(names) >= 5 and all(part["bytes"] <= 4096 for part in manifest["parts"])
    store, call = tmp_path / "store", tmp_path / "call"
    with pytest.raises(KitError, match="holds no part of the kit yet"):
        install(store)
    with pytest.raises(KitError, match="carry one part-NN"):
        receive(_carry(kit, call), store)
    for held, name in enumerate(names, start=1):
        assert receive(_carry(kit, call, name), store) == held
    # A part sent twice (a call retried) changes nothing.
    assert receive(_carry(kit, call, names[1]), store) == len(names)
    assert hashlib.sha256((store / "bundle.tar").read_bytes()).hexdigest() == manifest["sha256"]

    env = install(store, check_imports=False)
    assert (store / "bundle" / "model" / "weights.bin").read_bytes() == bytes(range(256)) * 40
    site = store / "site"
    assert (site / "tforgekitprobe" / "__init__.py").is_file()
    assert (site / "pytest" / "__init__.py").is_file()  # another version here: the kit's
    assert not (site / "pyyaml").exists()  # the same version here: the machine's own
    assert (store / "installed").read_text() == manifest["sha256"]
    probe = subprocess.run(
        [
            "bash",
            "-c",
            f"source {env} && {sys.executable} -c 'import tforgekitprobe as m; print(m.VERSION)'",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "0.1"


def test_a_part_out_of_order_or_on_a_fresh_machine_names_the_part_to_send(
    kit: Path, tmp_path: Path
) -> None:
    names = [part["name"] for part in json.loads((kit / "kit.json").read_text())["parts"]]
    store, call = tmp_path / "store", tmp_path / "call"
    # A fresh machine (the first parts were lost with an idle release).
    with pytest.raises(KitError, match=f"{names[2]} arrived before {names[0]}.*holds 0 bytes"):
        receive(_carry(kit, call, names[2]), store)
    receive(_carry(kit, call, names[0]), store)
    with pytest.raises(KitError, match=f"send {names[1]} next"):
        receive(_carry(kit, call, names[2]), store)
    with pytest.raises(KitError, match=f"send {names[1]} next"):
        install(store, check_imports=False)


def test_a_damaged_part_or_a_cut_off_append_is_caught(kit: Path, tmp_path: Path) -> None:
    names = [part["name"] for part in json.loads((kit / "kit.json").read_text())["parts"]]
    store, call = tmp_path / "store", tmp_path / "call"
    _carry(kit, call, names[0])
    (call / names[0]).write_bytes(b"x" + (kit / names[0]).read_bytes()[1:])
    with pytest.raises(KitError, match=f"{names[0]} is damaged"):
        receive(call, store)
    receive(_carry(kit, call, names[0]), store)
    # A call cut off while appending the second part left half of it.
    with (store / "bundle.tar").open("ab") as stream:
        stream.write((kit / names[1]).read_bytes()[:100])
    for held, name in enumerate(names[1:], start=2):
        assert receive(_carry(kit, call, name), store) == held
    install(store, check_imports=False)
    assert (store / "bundle" / "model" / "weights.bin").stat().st_size == 256 * 40


def test_the_same_payload_packs_to_the_same_bytes(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "a.txt").write_text("a")
    first = pack_folder(payload, tmp_path / "one", part_bytes=1024)
    (payload / "a.txt").touch()  # a newer time, the same content
    assert pack_folder(payload, tmp_path / "two", part_bytes=1024) == first


def test_several_parts_in_one_call_and_a_second_install_does_nothing(
    kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [part["name"] for part in json.loads((kit / "kit.json").read_text())["parts"]]
    store, call = tmp_path / "store", tmp_path / "call"
    # The repository copy keeps the earlier calls' parts: they arrive again beside the new one.
    assert receive(_carry(kit, call, *names[:3]), store) == 3
    assert receive(_carry(kit, call, *names), store) == len(names)
    # A package in ALWAYS is installed even at the machine's own version.
    monkeypatch.setattr(gpu_kit, "ALWAYS", {"pyyaml"})
    install(store, check_imports=False)
    assert (store / "site" / "pyyaml" / "__init__.py").is_file()
    marker = store / "site" / "left-by-the-first-install"
    marker.touch()
    install(store, check_imports=False)
    assert marker.exists()  # the same kit is not installed twice


def test_parts_of_an_earlier_kit_are_dropped(kit: Path, tmp_path: Path) -> None:
    store, call = tmp_path / "store", tmp_path / "call"
    names = [part["name"] for part in json.loads((kit / "kit.json").read_text())["parts"]]
    for name in names:
        receive(_carry(kit, call, name), store)
    payload = tmp_path / "smaller"
    payload.mkdir()
    (payload / "a.txt").write_text("a new kit")
    newer = tmp_path / "newer"
    pack_folder(payload, newer, part_bytes=4096)
    assert receive(_carry(newer, call, "part-01"), store) == 1
    manifest = json.loads((newer / "kit.json").read_text())
    assert (store / "bundle.tar").stat().st_size == manifest["parts"][0]["bytes"]


def test_packing_refuses_to_replace_a_folder_that_is_not_a_kit(tmp_path: Path) -> None:
    payload, out = tmp_path / "payload", tmp_path / "elsewhere"
    payload.mkdir()
    (payload / "a.txt").write_text("a")
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(KitError, match="not an earlier kit"):
        pack_folder(payload, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_pack_cut_short_leaves_the_earlier_kit_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload, out = tmp_path / "payload", tmp_path / "kit"
    payload.mkdir()
    (payload / "a.txt").write_text("a" * 5000)
    earlier = pack_folder(payload, out, part_bytes=4096)
    (payload / "a.txt").write_text("b" * 5000)

    def cut_short(bundle: Path, parts: Path, part_bytes: int) -> dict:
        (parts / "part-01").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(gpu_kit, "split", cut_short)
    with pytest.raises(OSError, match="disk full"):
        pack_folder(payload, out, part_bytes=4096)
    assert json.loads((out / "kit.json").read_text()) == earlier
    assert (
        hashlib.sha256((out / "part-01").read_bytes()).hexdigest() == earlier["parts"][0]["sha256"]
    )
    assert {p.name for p in tmp_path.iterdir()} == {"payload", "kit"}  # no scratch left


def test_a_call_without_kit_json_and_a_failed_import_check_are_clear(
    kit: Path, tmp_path: Path
) -> None:
    store, call = tmp_path / "store", tmp_path / "call"
    call.mkdir()
    (call / "part-01").write_bytes((kit / "part-01").read_bytes())
    with pytest.raises(KitError, match="holds no kit.json: carry it with each part"):
        receive(call, store)
    for part in json.loads((kit / "kit.json").read_text())["parts"]:
        receive(_carry(kit, call, part["name"]), store)
    # Here onnxruntime is this environment's, not the kit's: the check refuses, and without
    # env.sh gpu_session.sh will not start on a half-working install.
    with pytest.raises(KitError, match=r"tforge's imports fail: onnxruntime comes from"):
        install(store)
    assert not (store / "env.sh").exists() and not (store / "installed").exists()
