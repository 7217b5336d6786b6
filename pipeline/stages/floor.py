"""Stage ``floor``: PyTorch itself, cast to 16 bits, verified against its FP32 reference.

The model is cast whole (weights and every activation, as ``model.to(torch.float16)`` deploys
it) and run eagerly on exactly the reference's batches, measured as a variant is
(pipeline.stages.verify.compare_to_reference). Its figures are what any 16-bit deployment of
this model gives up with no compiler involved: the scale an FP16 variant's error is read
against. On MiniLM and the shipped evaluation texts, PyTorch fp16 keeps a mean cosine of
0.999999 and bf16 0.99994 (BENCHMARKS.md, "Accuracy floor: PyTorch cast to 16 bits").

A build with GPU variants runs the floor on the GPU, and adds PyTorch FP32 on that GPU: the
variants are then read against PyTorch FP32 and FP16 on the same device, next to the CPU FP32
record every variant is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.artifacts import Artifact
from pipeline.backends.torch_backend import TorchRunner, task_module
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.load import CheckpointInfo, loaded_model
from pipeline.stages.reference import ReferenceData
from pipeline.stages.verify import compare_to_reference

#: The torch dtype PyTorch is cast to, per precision name (decoders' floor reads it too).
FLOOR_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class FloorConfig(StageConfig):
    precisions: tuple[str, ...]
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int


def floor_precisions(requested: Sequence[str], gpu: bool) -> tuple[str, ...]:
    """What the floor casts PyTorch to: the recipe's precisions, and on a GPU build FP32 on the
    GPU first (its kernels differ from the CPU's, so it is measured rather than assumed)."""
    # In one order, so the recipe's listing order does not split the step's key.
    chosen = {*requested, "fp32"} if gpu and requested else set(requested)
    return tuple(p for p in FLOOR_DTYPES if p in chosen)


def _output(runner: TorchRunner, name: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    return lambda feed: runner.run(feed)[name]


class FloorStage(Stage[FloorConfig]):
    name = "floor"
    # PyTorch's half-precision CPU kernels differ per instruction set (AVX512-FP16, AMX...).
    facets = ("versions", "hardware")
    version = 1

    def key_facets(self) -> tuple[str, ...]:
        # On a GPU the figures depend on the GPU and its driver, not on the CPU.
        return ("versions", "gpu") if self.config.device == "cuda" else self.facets

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        cfg = self.config
        info = CheckpointInfo.read(inputs["info"])
        ref = ReferenceData.of(inputs["reference"])
        loaded = loaded_model(ctx, inputs["checkpoint"].path, info.task)
        module = task_module(loaded.model, info.task, tuple(info.inputs))
        stats: dict[str, Any] = {}
        for precision in cfg.precisions:
            runner = TorchRunner(
                module, info.output, cfg.threads, device=cfg.device, dtype=FLOOR_DTYPES[precision]
            )
            figures = compare_to_reference(
                ref,
                _output(runner, info.output),
                ctx.progress,
                f"PyTorch {precision} on {cfg.device}",
            )
            del runner  # one cast copy at a time
            stats[precision] = {"device": cfg.device, **figures}
        return StageResult(stats=stats)

    def describe(self) -> str:
        return f"PyTorch {', '.join(self.config.precisions)} on {self.config.device}"
