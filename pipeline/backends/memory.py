"""Peak memory of one contender, measured in a fresh process.

A process's peak RSS only grows, so contenders measured one after another in the build's own
process would all read the largest one so far. Each is measured instead in a new interpreter
(spawned, not forked, so nothing is inherited) that loads the model, runs the feed three times
and reports its peak: the memory a serving process needs for that model at that shape.

A probe on the GPU (``device="cuda"``: PyTorch eager and the variants of a build with GPU
targets) also reports the device memory the contender holds after those runs: the GPU's free
memory before the model is loaded less its free memory after, both read with the process's CUDA
context already made (so the context itself is not counted). ONNX Runtime's CUDA arena and
PyTorch's caching allocator keep what they reserve, so this is their peak; TensorRT's engine,
its activation memory and its buffers are counted the same way. Another process allocating on
the same GPU meanwhile would be counted too: measure on an otherwise idle GPU.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import TforgeError, first_line


@dataclass(frozen=True)
class MemoryProbe:
    #: "pytorch", "onnxruntime" or "tensorrt"; "pytorch-decoder" or "onnxruntime-decoder"
    #: generate ``new_tokens`` tokens from the feed's prompts instead of running it once.
    kind: str
    #: Checkpoint folder (pytorch), ONNX file (onnxruntime; tensorrt: a file in the engine's
    #: folder), the decoder's checkpoint folder or
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
    #: "cuda": PyTorch runs on the GPU (a GPU target's session always does), and the
    #: device memory the contender holds is measured too.
    device: str = "cpu"


@dataclass(frozen=True)
class Footprint:
    rss_bytes: int
    #: Device memory held after the runs (GPU probes only).
    device_bytes: int | None = None


def _free_device_bytes() -> int:
    """Free memory of the current CUDA device, after every queued kernel has finished."""
    import torch

    torch.cuda.synchronize()
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def _probe(probe: MemoryProbe, feed: dict[str, np.ndarray]) -> Footprint:
    from pipeline.environment import peak_rss_bytes

    free_before = None
    if probe.device == "cuda":
        import torch

        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the primary context, shared with ONNX Runtime and TensorRT
        free_before = _free_device_bytes()

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
            device=probe.device,
            owned=True,
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
    if free_before is None:
        return Footprint(peak_rss_bytes())
    return Footprint(peak_rss_bytes(), max(free_before - _free_device_bytes(), 0))


def footprint(probe: MemoryProbe, feed: dict[str, np.ndarray]) -> Footprint:
    """Peak resident bytes (and, on the GPU, device bytes held) of a fresh process that loads
    ``probe`` and runs ``feed``."""
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
        except Exception as error:
            if probe.device == "cpu":
                raise
            # On a GPU, running out of device memory is an exception in the probe, not a death.
            raise TforgeError(
                f"the memory probe for {probe.path} on {probe.device} failed ({first_line(error)})",
                "set latency.memory: false to skip peak-memory measurement",
            ) from error
