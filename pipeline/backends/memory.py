"""Peak memory of one contender, measured in a fresh process.

A process's peak RSS only grows, so contenders measured one after another in the build's own
process would all read the largest one so far. Each is measured instead in a new interpreter
(spawned, not forked, so nothing is inherited) that loads the model, runs the feed three times
and reports its peak: the memory a serving process needs for that model at that shape.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import TforgeError


@dataclass(frozen=True)
class MemoryProbe:
    #: "pytorch" or "onnxruntime"; "pytorch-decoder" or "onnxruntime-decoder" generate
    #: ``new_tokens`` tokens from the feed's prompts instead of running it once.
    kind: str
    #: Checkpoint folder (pytorch), ONNX file (onnxruntime), the decoder's checkpoint folder or
    #: GGUF file (pytorch-decoder), or its prefill/decode folder (onnxruntime-decoder).
    path: str
    threads: int
    task: str = "feature-extraction"
    inputs: tuple[str, ...] = ()
    optimization: str = "all"
    new_tokens: int = 0
    #: onnxruntime: the CPU target the session runs on (ort-cpu or ort-openvino), and the
    #: variant's precision (OpenVINO computes at it).
    target: str = "ort-cpu"
    precision: str = "fp32"
    #: ort-openvino with static_shapes: the (batch, sequence) shapes it is compiled for.
    shapes: tuple[tuple[int, int], ...] = ()


def _probe(probe: MemoryProbe, feed: dict[str, np.ndarray]) -> int:
    from pipeline.environment import peak_rss_bytes

    if probe.kind.endswith("-decoder"):
        from pipeline.decoders.generate import OrtGenerator, StepGenerator, TorchGenerator
        from pipeline.decoders.load import load_decoder

        generator: StepGenerator
        if probe.kind == "pytorch-decoder":
            import torch

            torch.set_num_threads(probe.threads)
            generator = TorchGenerator(load_decoder(Path(probe.path))[0])
        else:
            generator = OrtGenerator(Path(probe.path), probe.threads, probe.optimization)
        for _ in range(2):
            generator.step_logits(feed["input_ids"], feed["attention_mask"], None, probe.new_tokens)
    elif probe.kind == "pytorch":
        from pipeline.backends.torch_backend import (
            OUTPUT_NAME,
            TorchRunner,
            load_model,
            task_module,
        )

        loaded = load_model(Path(probe.path), probe.task)
        runner = TorchRunner(
            task_module(loaded.model, probe.task, probe.inputs),
            OUTPUT_NAME[probe.task],
            probe.threads,
        )
        prepared = runner.prepare(feed)
        for _ in range(3):
            runner.call(prepared)
    else:
        from pipeline.backends.runners import runner_for

        model = Path(probe.path)
        ort_runner = runner_for(
            probe.target,
            model.parent,
            probe.threads,
            probe.optimization,
            model.parent.name,
            probe.precision,
            probe.shapes,
        )
        prepared_ort = ort_runner.prepare(feed)
        for _ in range(3):
            ort_runner.call(prepared_ort)
    return peak_rss_bytes()


def peak_rss(probe: MemoryProbe, feed: dict[str, np.ndarray]) -> int:
    """Peak resident bytes of a fresh process that loads ``probe`` and runs ``feed``."""
    with ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        try:
            return pool.submit(_probe, probe, feed).result()
        except BrokenProcessPool:
            raise TforgeError(
                f"the memory probe for {probe.path} died (out of memory?)",
                "set latency.memory: false to skip peak-memory measurement",
            ) from None
