"""Fusion taken apart: which fusion, at which ONNX Runtime session level, is worth what.

The exported MiniLM graph goes through tforge's own graph passes once per combination
(pipeline.passes.profile_passes), and every combination is timed side by side by the
benchmark harness, one fresh process per shape, round-robin. The tables in BENCHMARKS.md
("Fusion, one by one") come from here; tforge's default per target is the fastest row.

    python -m benchmarks.fusion          # alone: prints the table (run.py includes it)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "fusion"

#: (name, optimize profile, fusions, ORT session level)
COMBINATIONS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("export (unfused) @all", "none", (), "all"),
    ("standard @all", "standard", (), "all"),
    ("attention @basic", "ort", ("attention",), "basic"),
    ("attention + ffn @basic", "ort", ("attention", "ffn"), "basic"),
    ("attention + skip-layernorm @basic", "ort", ("attention", "skip-layernorm"), "basic"),
    ("all three @basic", "ort", ("attention", "skip-layernorm", "ffn"), "basic"),
    ("attention + ffn @all", "ort", ("attention", "ffn"), "all"),
    ("all three @all", "ort", ("attention", "skip-layernorm", "ffn"), "all"),
]
SHAPES = ((1, 128), (8, 128), (1, 512))


def make_graphs(exported: Path) -> list[dict[str, Any]]:
    """Each combination's graph, written once, with its fused-op counts."""
    import onnx_ir as ir

    from pipeline.passes import FUSED_OP_TYPES, profile_passes, run_passes

    WORK.mkdir(parents=True, exist_ok=True)
    out = []
    for index, (name, profile, fusions, session) in enumerate(COMBINATIONS):
        model = ir.load(exported)
        if profile != "none":
            model, _ = run_passes(model, profile_passes(profile, fusions))  # type: ignore[arg-type]
        counts = {op: sum(n.op_type == op for n in model.graph) for op in FUSED_OP_TYPES}
        path = WORK / f"graph-{index}.onnx"
        ir.save(model, path)
        out.append(
            {
                "name": name,
                "path": str(path),
                "session": session,
                "nodes": len(model.graph),
                "fused": {op: n for op, n in counts.items() if n},
            }
        )
    return out


def ablation(
    model_folder: Path, exported: Path, threads: int, rounds: int, passes: int
) -> dict[str, Any]:
    from benchmarks.run import harness, timing_args

    graphs = make_graphs(exported)
    spec = {
        "model": {
            "folder": str(model_folder),
            "inputs": ["input_ids", "attention_mask", "token_type_ids"],
            "pooling": "mean",
        },
        "evaluation": str(ROOT / "calibration" / "evaluation.jsonl"),
        "contenders": [
            {"name": g["name"], "kind": "onnx", "path": g["path"], "session": g["session"]}
            for g in graphs
        ],
    }
    timings = [
        harness(
            spec,
            f"fusion-b{batch}s{sequence}",
            timing_args(batch, sequence, threads, 3, rounds, passes),
        )
        for batch, sequence in SHAPES
    ]
    return {"graphs": graphs, "timings": timings, "threads": threads}


def main() -> None:
    from benchmarks.markdown import fusion_section
    from benchmarks.run import WORK as RUN_WORK
    from benchmarks.run import minilm

    exported = (
        RUN_WORK / "tforge" / "minilm" / "runs" / "bench" / "models" / "fp32-unfused" / "model.onnx"
    )
    if not exported.exists():
        raise SystemExit(
            f"{exported} is missing: run `python -m benchmarks.run` (or --quick) first"
        )
    result = ablation(minilm().folder, exported, threads=2, rounds=20, passes=2)
    print("\n".join(fusion_section(result)))


if __name__ == "__main__":
    main()
