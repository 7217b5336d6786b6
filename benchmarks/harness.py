"""The benchmark's measuring process: one model, one shape, one thread count, every contender.

Run by ``benchmarks/run.py`` in a fresh process per shape (so no contender inherits another
shape's caches or allocator state), and by a test on a tiny model. It loads every contender,
checks each gives an output of the right shape, then times them round-robin: a warm-up, then
``rounds`` rounds of one call each, and the whole pass again to show the spread.

OpenVINO contenders run either through ONNX Runtime's OpenVINO provider (tforge's
``ort-openvino`` variants) or through OpenVINO's own runtime (the peers), with the same
OpenVINO properties. A contender marked ``static`` is compiled for the shape it runs (the timed
shape; in accuracy mode, the batch size and longest sequence, inputs padded up to it), as a
tforge variant with ``static_shapes`` and a peer reshaped with OpenVINO's ``Model.reshape``.

Fairness between runtimes in one process: ONNX Runtime sessions use tforge's session options
(intra-op threads set, spinning off, which otherwise steals the core from the next contender)
and ORT_ENABLE_ALL, except where a tforge variant chose its level (its recipe's
``session_optimization``: part of what tforge builds).
PyTorch keeps its OpenMP defaults (OMP_WAIT_POLICY=PASSIVE would slow PyTorch itself by
5-15%), and the loop idles 10 ms, untimed, after each PyTorch call: its OpenMP threads keep
spinning after a call, and without the pause the contender that runs next loses a core to them.

Usage: python -m benchmarks.harness SPEC.json --mode time --shape 8x128 --threads 2 --out OUT.json
       python -m benchmarks.harness SPEC.json --mode accuracy --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import metrics  # noqa: E402
from pipeline.backends.static_shapes import pad  # noqa: E402
from pipeline.backends.timing import SETTLE_AFTER_TORCH, LatencyStats, time_interleaved  # noqa: E402
from pipeline.calibration import read_samples  # noqa: E402


class Contender:
    """A named callable over numpy feeds that returns ``[batch, seq, hidden]`` float32."""

    def __init__(
        self,
        name: str,
        prepare: Callable[[dict[str, np.ndarray]], Any],
        call: Callable[[Any], Any],
        output: Callable[[Any], np.ndarray],
    ):
        self.name = name
        self.prepare = prepare
        self.call = call
        self.output = output

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.output(self.call(self.prepare(feed)))


def _torch_contender(
    name: str, folder: Path, kind: str, threads: int, inputs: list[str]
) -> tuple[Contender, dict[str, Any]]:
    import torch

    from pipeline.backends.torch_backend import load_model, task_module

    torch.set_num_threads(threads)
    loaded = load_model(folder, "feature-extraction")
    module = task_module(loaded.model, "feature-extraction", tuple(inputs))
    info: dict[str, Any] = {}
    if kind == "torch-bf16":
        module = module.to(torch.bfloat16)
    if kind == "torch-compile":
        start = time.perf_counter()
        module = torch.compile(module)  # type: ignore[assignment]
        info["compile_note"] = "compiled lazily on the first (warm-up) call"
        info["wrap_seconds"] = time.perf_counter() - start

    def prepare(feed: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: torch.from_numpy(np.ascontiguousarray(feed[k])) for k in inputs}

    def call(prepared: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return module(**prepared)

    return Contender(name, prepare, call, lambda out: out.float().numpy()), info


def _onnx_contender(
    name: str,
    path: Path,
    threads: int,
    session: str = "all",
    target: str = "ort-cpu",
    precision: str = "fp32",
    shape: tuple[int, int] | None = None,
) -> Contender:
    """An ONNX model on a tforge target (``shape``: compiled for it, ort-openvino only)."""
    from pipeline.backends.onnxruntime_backend import OrtRunner

    if shape is not None:
        from pipeline.backends.runners import runner_for
        from pipeline.stages.export import MODEL_FILE

        if path.name != MODEL_FILE:
            raise ValueError(f"{name}: a static contender is a tforge variant's {MODEL_FILE}")
        static = runner_for(target, path.parent, threads, session, name, precision, [shape])
        # Padded once in prepare (untimed); the outputs are cut back to the feed's shape after.
        return Contender(
            name,
            static.prepare,
            lambda prepared: (prepared, static.call(prepared)),
            lambda out: static.outputs(*out)["last_hidden_state"],
        )
    if target == "ort-openvino":
        runner = OrtRunner(
            path, threads, session, name=name, device="openvino", precision=precision
        )
    else:
        runner = OrtRunner(path, threads, session, name=name)
    outputs = runner.output_names
    index = outputs.index("last_hidden_state") if "last_hidden_state" in outputs else 0
    # Bound once (IOBinding), as tforge's latency stage times every ONNX Runtime session.
    return Contender(
        name,
        runner.prepare,
        runner.call,
        lambda out: np.asarray(runner.fetch(out)[index], dtype=np.float32),
    )


def _openvino_contender(
    name: str, path: Path, threads: int, shape: tuple[int, int] | None = None
) -> Contender:
    """OpenVINO's own runtime (the ``openvino`` package), with the settings tforge gives its
    provider: the thread count, one stream, the latency hint, and OpenVINO's default
    inference precision (bf16 on CPUs that have it); with ``shape``, every input reshaped to it
    and feeds padded up to it as tforge's static runner pads them."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if shape is not None:
        model.reshape({i.get_any_name(): list(shape) for i in model.inputs})
    compiled = core.compile_model(
        model,
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    output = next(
        (i for i, o in enumerate(compiled.outputs) if "last_hidden_state" in o.get_names()), 0
    )

    def prepare(feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
        rows, columns = feed[names[0]].shape
        arrays = {k: np.ascontiguousarray(feed[k]) for k in names}
        if shape is not None:
            arrays = {k: pad(v, shape) for k, v in arrays.items()}
        return arrays, (rows, columns)

    def call(prepared: tuple[dict[str, np.ndarray], tuple[int, int]]) -> Any:
        arrays, (rows, columns) = prepared
        return np.asarray(request.infer(arrays, share_inputs=True)[output], dtype=np.float32)[
            :rows, :columns
        ]

    return Contender(name, prepare, call, lambda out: out)


def load_contenders(
    spec: dict[str, Any], threads: int, shape: tuple[int, int] | None = None
) -> tuple[dict[str, Contender], dict[str, Any]]:
    """Every contender of ``spec``; those marked ``static`` compiled for ``shape``."""
    folder = Path(spec["model"]["folder"])
    inputs = spec["model"]["inputs"]
    contenders: dict[str, Contender] = {}
    notes: dict[str, Any] = {}
    for item in spec["contenders"]:
        if item["kind"].startswith("torch"):
            contenders[item["name"]], notes[item["name"]] = _torch_contender(
                item["name"], folder, item["kind"], threads, inputs
            )
        elif item["kind"] == "openvino":
            contenders[item["name"]] = _openvino_contender(
                item["name"], Path(item["path"]), threads, shape if item.get("static") else None
            )
        else:
            contenders[item["name"]] = _onnx_contender(
                item["name"],
                Path(item["path"]),
                threads,
                item.get("session", "all"),
                item.get("target", "ort-cpu"),
                item.get("precision", "fp32"),
                shape if item.get("static") else None,
            )
    return contenders, notes


def _tokenizer(spec: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec["model"]["folder"], local_files_only=True)


def time_shape(
    spec: dict[str, Any],
    batch: int,
    sequence: int,
    threads: int,
    warmup: int,
    rounds: int,
    passes: int,
) -> dict[str, Any]:
    from pipeline.stages.latency import timing_feed, token_stream

    tokenizer = _tokenizer(spec)
    texts = [
        s.text for s in read_samples(Path(spec["evaluation"]), kind="evaluation", limit=10_000)
    ]
    feed = timing_feed(
        token_stream(tokenizer, texts), tokenizer, spec["model"]["inputs"], batch, sequence
    )
    contenders, notes = load_contenders(spec, threads, (batch, sequence))
    calls = {}
    first_call: dict[str, float] = {}
    for name, contender in contenders.items():
        prepared = contender.prepare(feed)
        start = time.perf_counter()
        out = contender.output(contender.call(prepared))
        first_call[name] = time.perf_counter() - start  # includes torch.compile's compilation
        if out.shape[:2] != (batch, sequence):
            raise RuntimeError(f"{name}: output shape {out.shape} for input {batch}x{sequence}")
        calls[name] = lambda contender=contender, prepared=prepared: contender.call(prepared)
    # PyTorch's OpenMP threads spin after a call; the next contender would pay for it.
    kinds = {item["name"]: item["kind"] for item in spec["contenders"]}
    settle = {name: SETTLE_AFTER_TORCH for name in calls if kinds.get(name, "").startswith("torch")}
    results: dict[str, Any] = {name: {"passes": []} for name in calls}
    for _ in range(passes):
        times = time_interleaved(calls, warmup=warmup, runs=rounds, settle_after=settle)
        for name, seconds in times.items():
            results[name]["passes"].append(LatencyStats.of(seconds, batch).as_dict())
    for name, result in results.items():
        p50s = [p["p50_ms"] for p in result["passes"]]
        result["p50_ms"] = float(np.median(p50s))
        result["p90_ms"] = float(np.median([p["p90_ms"] for p in result["passes"]]))
        result["spread_pct"] = round(100 * (max(p50s) - min(p50s)) / min(p50s), 2)
        result["first_call_s"] = round(first_call[name], 3)
        result.update(notes.get(name, {}))
    return {
        "batch": batch,
        "sequence": sequence,
        "threads": threads,
        "warmup": warmup,
        "rounds": rounds,
        "passes": passes,
        "contenders": results,
    }


def accuracy(
    spec: dict[str, Any], threads: int, batch_size: int = 32, max_length: int = 128
) -> dict[str, Any]:
    """Every contender against PyTorch FP32 eager on the evaluation texts (right-padded batches)."""
    tokenizer = _tokenizer(spec)
    texts = [
        s.text for s in read_samples(Path(spec["evaluation"]), kind="evaluation", limit=10_000)
    ]
    inputs = spec["model"]["inputs"]
    contenders, _ = load_contenders(
        {**spec, "contenders": [c for c in spec["contenders"] if c["kind"] != "torch-compile"]},
        threads,
        (batch_size, max_length),
    )
    reference = _torch_contender(
        "reference", Path(spec["model"]["folder"]), "torch", threads, inputs
    )[0]
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in [*contenders, "reference"]}
    worst: dict[str, float] = dict.fromkeys(contenders, 0.0)
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        feed = {k: encoded[k].astype(np.int64) for k in inputs}
        mask = encoded["attention_mask"]
        ref = reference.run(feed)
        pooled["reference"].append(metrics.pool(ref, mask, spec["model"]["pooling"]))
        for name, contender in contenders.items():
            out = contender.run(feed)
            pooled[name].append(metrics.pool(out, mask, spec["model"]["pooling"]))
            worst[name] = max(worst[name], metrics.token_errors(ref, out, mask)[0])
    ref_vectors = np.concatenate(pooled["reference"])
    results = {}
    for name in contenders:
        vectors = np.concatenate(pooled[name])
        cos = metrics.cosine(ref_vectors, vectors)
        results[name] = {
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "agreement": metrics.neighbour_agreement(ref_vectors, vectors),
            "max_abs_error": worst[name],
        }
    return {"samples": len(texts), "contenders": results}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", type=Path)
    parser.add_argument("--mode", choices=["time", "accuracy"], required=True)
    parser.add_argument("--shape", default="1x128", help="BATCHxSEQUENCE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    if args.mode == "time":
        batch, sequence = (int(x) for x in args.shape.lower().split("x"))
        result = time_shape(
            spec, batch, sequence, args.threads, args.warmup, args.rounds, args.passes
        )
    else:
        result = accuracy(spec, args.threads)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
