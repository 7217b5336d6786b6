"""Stage ``latency``: PyTorch eager and every variant, timed together on the same inputs.

For each batch x sequence in the recipe, every contender is warmed up and then timed
round-robin (one call each per round), with PyTorch and ONNX Runtime on the same number of
intra-op threads and ONNX Runtime's thread spinning off (see backends.onnxruntime_backend).
Inputs are real token ids: the evaluation texts' tokens, concatenated and cut to the sequence
length, with a full attention mask, never all-zero arrays.

Also recorded: each contender's size on disk and, optionally, its peak RSS in a fresh process
at the largest shape. Results depend on the machine, so the key includes the hardware.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.artifacts import Artifact, size_of
from pipeline.backends.memory import Footprint, MemoryProbe, footprint
from pipeline.backends.runners import GPU_TARGETS, model_size, runner_for
from pipeline.backends.timing import SETTLE_AFTER_TORCH, LatencyStats, time_interleaved
from pipeline.backends.torch_backend import TorchRunner, task_module
from pipeline.calibration import read_samples
from pipeline.errors import InputError
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.export import MODEL_FILE
from pipeline.stages.load import CheckpointInfo, loaded_model

PYTORCH = "pytorch"


def weights_size(folder: Path) -> int:
    """Bytes of a checkpoint's weights: its safetensors shards, else its pickle shards."""
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return sum(size_of(f) for f in files)
    return 0


def shape_key(batch: int, sequence: int) -> str:
    return f"b{batch}s{sequence}"


def token_stream(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """The texts' token ids (without special tokens), concatenated."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = np.fromiter((t for row in ids for t in row), dtype=np.int64)
    if stream.size == 0:
        raise InputError(
            "the evaluation texts produce no tokens to time with",
            "give data.evaluation some real text",
        )
    return stream


def timing_feed(
    stream: np.ndarray, tokenizer: Any, inputs: list[str], batch: int, sequence: int
) -> dict[str, np.ndarray]:
    """``batch`` rows of real text, ``sequence`` tokens each, framed by the model's special tokens."""
    start, end = tokenizer.cls_token_id, tokenizer.sep_token_id
    if start is None or end is None:
        start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = sequence - (start is not None) - (end is not None)
    need = batch * body
    reps = -(-need // stream.size)
    rows = np.tile(stream, reps)[:need].reshape(batch, body)
    parts = (
        ([np.full((batch, 1), start)] if start is not None else [])
        + [rows]
        + ([np.full((batch, 1), end)] if end is not None else [])
    )
    input_ids = np.concatenate(parts, axis=1).astype(np.int64)
    feed = {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "token_type_ids": np.zeros_like(input_ids),
    }
    return {name: feed[name] for name in inputs}


def peak_memory(
    ctx: BuildContext, probes: Mapping[str, MemoryProbe], feed: dict[str, np.ndarray]
) -> dict[str, Footprint]:
    """Each contender's footprint, one fresh process at a time, with progress."""
    found = {}
    with ctx.progress.task("peak memory", total=len(probes)) as advance:
        for name, probe in probes.items():
            found[name] = footprint(probe, feed)
            advance(1)
    return found


def memory_stats(found: Mapping[str, Footprint]) -> dict[str, Any]:
    """``peak_rss_bytes`` per contender, and ``device_bytes`` for those probed on the GPU."""
    stats: dict[str, Any] = {"peak_rss_bytes": {n: f.rss_bytes for n, f in found.items()}}
    device = {n: f.device_bytes for n, f in found.items() if f.device_bytes is not None}
    if device:
        stats["device_bytes"] = device
    return stats


class TimingConfig(StageConfig):
    """What every latency stage times: shapes, rounds, threads, the variants' sessions."""

    #: (batch, sequence) pairs; for decoders the sequence is the prompt length.
    shapes: tuple[tuple[int, int], ...]
    warmup: int
    runs: int
    threads: int
    memory: bool
    #: Variant name -> ONNX Runtime session optimisation level.
    variants: dict[str, str]
    text_field: str


class LatencyConfig(TimingConfig):
    #: Variant name -> target, for variants not on ort-cpu (so CPU-only builds keep their keys).
    targets: dict[str, str] = Field(default_factory=dict)
    #: Variant name -> precision, for variants whose runtime computes at it (ort-openvino:
    #: a bf16 variant's graph is FP32).
    precisions: dict[str, str] = Field(default_factory=dict)
    #: Variant name -> the (batch, sequence) shapes it is compiled for (ort-openvino variants
    #: with static_shapes).
    static_shapes: dict[str, tuple[tuple[int, int], ...]] = Field(default_factory=dict)


class LatencyStage(Stage[LatencyConfig]):
    name = "latency"
    facets = ("versions", "hardware")

    @property
    def gpu(self) -> bool:
        """A build with GPU variants: PyTorch is timed and probed on the GPU too."""
        return any(t in GPU_TARGETS for t in self.config.targets.values())

    def key_facets(self) -> tuple[str, ...]:
        return (*self.facets, "gpu") if self.gpu else self.facets

    def key_config(self) -> dict[str, Any]:
        config = super().key_config()
        for name in ("targets", "precisions", "static_shapes"):
            if not config[name]:
                del config[name]
        if config.get("memory") and self.gpu:
            config["memory_probe"] = "gpu"  # GPU contenders probed on the device (device_bytes)
        return config

    def probes(
        self, folder: Path, info: CheckpointInfo, paths: Mapping[str, Path]
    ) -> dict[str, MemoryProbe]:
        """One fresh-process probe per contender: on the GPU for PyTorch and the GPU variants
        of a build with GPU targets (host RSS and device memory), on the CPU otherwise."""
        cfg = self.config
        probes = {
            PYTORCH: MemoryProbe(
                PYTORCH,
                str(folder),
                cfg.threads,
                info.task,
                tuple(info.inputs),
                device="cuda" if self.gpu else "cpu",
            )
        }
        for name, path in paths.items():
            target = cfg.targets.get(name, "ort-cpu")
            probes[name] = MemoryProbe(
                "tensorrt" if target == "tensorrt" else "onnxruntime",
                str(path / MODEL_FILE),
                cfg.threads,
                optimization=cfg.variants[name],
                target=target,
                precision=cfg.precisions.get(name, "fp32"),
                shapes=cfg.static_shapes.get(name, ()),
                device="cuda" if target in GPU_TARGETS else "cpu",
            )
        return probes

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        cfg = self.config
        info = CheckpointInfo.read(inputs["info"])
        folder = inputs["checkpoint"].path
        loaded = loaded_model(ctx, folder, info.task)
        texts = [
            s.text
            for s in read_samples(
                inputs["evaluation"].path,
                kind="evaluation",
                text_field=cfg.text_field,
                limit=10_000,
            )
        ]
        stream = token_stream(loaded.tokenizer, texts)

        # With GPU variants, PyTorch eager is timed on the GPU too: the speed-up compares like
        # with like.
        gpu = self.gpu
        runners: dict[str, Any] = {
            PYTORCH: TorchRunner(
                task_module(loaded.model, info.task, tuple(info.inputs)),
                info.output,
                cfg.threads,
                device="cuda" if gpu else "cpu",
            )
        }
        paths: dict[str, Path] = {}
        for variant, optimization in cfg.variants.items():
            target = cfg.targets.get(variant, "ort-cpu")
            paths[variant] = inputs[f"model:{variant}"].path
            runners[variant] = runner_for(
                target,
                paths[variant],
                cfg.threads,
                optimization,
                variant,
                cfg.precisions.get(variant, "fp32"),
                cfg.static_shapes.get(variant, ()),
            )

        results: dict[str, dict[str, Any]] = {name: {} for name in runners}
        with ctx.progress.task("latency", total=len(cfg.shapes) * cfg.runs) as advance:
            for batch, sequence in cfg.shapes:
                feed = timing_feed(stream, loaded.tokenizer, info.inputs, batch, sequence)
                calls = {}
                for name, runner in runners.items():
                    prepared = runner.prepare(feed)
                    calls[name] = lambda runner=runner, prepared=prepared: runner.call(prepared)
                times = time_interleaved(
                    calls,
                    warmup=cfg.warmup,
                    runs=cfg.runs,
                    on_round=lambda: advance(1),
                    settle_after={PYTORCH: SETTLE_AFTER_TORCH},
                )
                for name, seconds in times.items():
                    results[name][shape_key(batch, sequence)] = LatencyStats.of(
                        seconds, batch
                    ).as_dict()

        sizes = {PYTORCH: weights_size(folder)}
        sizes.update(
            {name: model_size(cfg.targets.get(name, "ort-cpu"), p) for name, p in paths.items()}
        )
        stats: dict[str, Any] = {
            "pytorch_device": "cuda" if gpu else "cpu",
            "threads": cfg.threads,
            "warmup": cfg.warmup,
            "runs": cfg.runs,
            "shapes": [shape_key(b, s) for b, s in cfg.shapes],
            "contenders": results,
            "size_bytes": sizes,
        }
        if cfg.memory:
            batch, sequence = max(cfg.shapes, key=lambda bs: bs[0] * bs[1])
            feed = timing_feed(stream, loaded.tokenizer, info.inputs, batch, sequence)
            # Each probe loads its contender afresh: the timed ones let go of the device first
            # (their sessions, engines and prepared inputs).
            del runners, calls, runner, prepared
            if gpu:
                import torch

                torch.cuda.empty_cache()
            stats.update(memory_stats(peak_memory(ctx, self.probes(folder, info, paths), feed)))
            stats["memory_shape"] = shape_key(batch, sequence)
        return StageResult(stats=stats)
