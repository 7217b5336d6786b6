"""GPU benchmark: ONNX Runtime CUDA beside PyTorch eager (FP32, FP16) and torch.compile, one process.

For a CUDA machine (docs/gpu.md): it needs torch, transformers, numpy and onnxruntime-gpu, and
the ONNX graphs of a ``tforge build`` (made there by benchmarks/gpu_session.sh, or anywhere and
carried over). Contenders are timed interleaved, round-robin, on real text tokens,
inputs and outputs on the device (ORT IOBinding; torch tensors on CUDA), each call synchronised;
p50/p90/p99 per shape. Accuracy: each contender's mean-pooled embeddings against PyTorch FP32 on
the same device, on real evaluation texts (mean and worst cosine).

    python -m benchmarks.gpu --checkpoint CKPT --onnx fp32=DIR --onnx fp16=DIR \\
        --shapes b1s128,b8s128,b32s128 --compile --out gpu.json

CKPT is a Hugging Face checkpoint folder (for PyTorch and the tokenizer); each DIR a tforge
model folder (``artifacts/runs/<run>/models/<variant>``). ``--device cpu`` runs the same code on
the CPU (a smoke test of the script; its numbers mean nothing for a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "calibration" / "evaluation.jsonl"


def token_feed(
    tokenizer: Any, texts: list[str], batch: int, sequence: int
) -> dict[str, np.ndarray]:
    """``batch`` rows of exactly ``sequence`` real tokens: the texts' tokens packed end to end."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    need = batch * (sequence - 2)
    while len(stream) < need:
        stream += stream
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = [
        [cls, *stream[i * (sequence - 2) : (i + 1) * (sequence - 2)], sep] for i in range(batch)
    ]
    ids = np.asarray(rows, dtype=np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * weights).sum(1) / np.clip(weights.sum(1), 1, None)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def torch_contenders(checkpoint: Path, device: str, compile_fp16: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModel

    from pipeline.backends.torch_backend import TorchRunner, task_module

    inputs = ("input_ids", "attention_mask", "token_type_ids")
    model = AutoModel.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    module = task_module(model, "feature-extraction", inputs)
    # Each FP16 runner casts its own copy of the FP32 model whole, as model.half() deploys it.
    out: dict[str, Any] = {
        "pytorch-fp32": TorchRunner(module, "last_hidden_state", device=device),
        "pytorch-fp16": TorchRunner(module, "last_hidden_state", device=device, dtype="float16"),
    }
    if compile_fp16:
        compiled = TorchRunner(module, "last_hidden_state", device=device, dtype="float16")
        compiled.module = torch.compile(compiled.module)  # type: ignore[assignment]
        out["pytorch-fp16-compile"] = compiled
    return out


def ort_contenders(models: list[str], device: str) -> dict[str, Any]:
    from pipeline.backends.onnxruntime_backend import OrtRunner

    out = {}
    for spec in models:
        name, _, folder = spec.partition("=")
        out[f"ort-{name}"] = OrtRunner(
            Path(folder) / "model.onnx",
            threads=1,
            optimization="all",
            name=name,
            device="cuda" if device == "cuda" else "cpu",
        )
    return out


def environment(device: str) -> dict[str, Any]:
    import onnxruntime
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="Checkpoint folder, or package:<name> (tforge's form)."
    )
    parser.add_argument("--onnx", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--shapes", default="b1s128,b8s128,b32s128")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile (FP16).")
    parser.add_argument("--out", type=Path, default=Path("gpu-results.json"))
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from pipeline.backends.timing import LatencyStats, time_interleaved

    if args.checkpoint.startswith("package:"):
        from pipeline.stages.load import resolve_source

        args.checkpoint = str(resolve_source(args.checkpoint))
    args.checkpoint = Path(args.checkpoint)
    texts = [json.loads(line)["text"] for line in TEXTS.read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(str(args.checkpoint))
    contenders = {
        **torch_contenders(args.checkpoint, args.device, args.compile),
        **ort_contenders(args.onnx, args.device),
    }

    # Accuracy: 64 real texts in one padded batch, against PyTorch FP32 on the same device.
    encoded = tokenizer(
        texts[:64], padding=True, truncation=True, max_length=128, return_tensors="np"
    )
    feed = {
        k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    pooled = {}
    for name, runner in contenders.items():
        wanted = getattr(runner, "input_names", list(feed))
        output = runner.run({k: v for k, v in feed.items() if k in wanted})
        hidden = output["last_hidden_state"]
        pooled[name] = mean_pool(hidden, feed["attention_mask"])
    accuracy = {}
    for name, vectors in pooled.items():
        cos = cosines(pooled["pytorch-fp32"], vectors)
        accuracy[name] = {"mean_cosine": float(cos.mean()), "worst_cosine": float(cos.min())}

    timings: dict[str, dict[str, Any]] = {name: {} for name in contenders}
    shapes = [s for s in args.shapes.split(",") if s]
    base = "pytorch-fp16" if "pytorch-fp16" in timings else "pytorch-fp32"
    results = {
        "command": "python -m benchmarks.gpu "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(args.device),
        "shapes": shapes,
        "accuracy": accuracy,
        "latency": timings,
        "speedup_over": base,
    }
    for shape in shapes:
        batch, _, sequence = shape[1:].partition("s")
        shape_feed = token_feed(tokenizer, texts, int(batch), int(sequence))
        calls = {}
        for name, runner in contenders.items():
            wanted = getattr(runner, "input_names", list(shape_feed))
            prepared = runner.prepare({k: v for k, v in shape_feed.items() if k in wanted})
            calls[name] = lambda runner=runner, prepared=prepared: runner.call(prepared)
        times = time_interleaved(calls, warmup=args.warmup, runs=args.runs)
        for name, seconds in times.items():
            timings[name][shape] = LatencyStats.of(seconds, int(batch)).as_dict()
        # Written after each shape: a session cut short keeps the shapes it timed.
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{shape}: done", file=sys.stderr, flush=True)

    header = f"{'contender':<24}" + "".join(f"{s + ' p50 ms':>16}{'x ' + base:>22}" for s in shapes)
    print(header + f"{'mean cos':>12}")
    for name in contenders:
        row = f"{name:<24}"
        for shape in shapes:
            p50 = timings[name][shape]["p50_ms"]
            row += f"{p50:>16.3f}{timings[base][shape]['p50_ms'] / p50:>22.2f}"
        print(row + f"{accuracy[name]['mean_cosine']:>12.6f}")
    return results


if __name__ == "__main__":
    main()
