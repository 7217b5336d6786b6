"""Stage ``compile``: a TensorRT engine from a variant's final ONNX graph.

Input: the variant's model folder (the ``standard``-profile graph: FP32, the typed FP16 graph, or
static Q/DQ INT8). Output: ``engine.plan``, ``engine.json`` (:class:`EngineMetadata`: TensorRT
version, GPU, compute capability, profile, the ONNX file's hash, builder settings) and the
tokenizer and config files of the model folder, so the folder deploys as it is.

The optimization profile comes from the recipe (see ``derive_profile``); the builder settings are
translated for the installed TensorRT (``builder_settings``). The step's key includes the
TensorRT version and the GPU, so an engine is never served to another device.

Timing cache: kept beside the artifact store, one file per TensorRT version and GPU
(``<artifacts>/tensorrt/<version>-<gpu>.timing``), read before and replaced atomically after each
build. It only saves build time: TensorRT re-times any tactic it lacks.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from pipeline.artifacts import Artifact, sha256_path, write_bytes_atomic
from pipeline.backends.tensorrt_backend import (
    ENGINE_FILE,
    METADATA_FILE,
    EngineMetadata,
    Profile,
    build_engine,
    builder_settings,
)
from pipeline.errors import PreconditionError, TargetUnavailable
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.export import MODEL_FILE


class CompileConfig(StageConfig):
    variant: str
    precision: str
    #: min / opt / max as [batch, sequence].
    profile: dict[str, list[int]]
    optimization_level: int
    workspace_mb: int | None
    timing_cache: bool


def timing_cache_path(root: Path, version: str, gpu: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-")
    return root / "tensorrt" / f"{version}-{safe}.timing"


class CompileStage(Stage[CompileConfig]):
    name = "compile"
    facets = ("versions", "gpu")

    def requires(self, inputs: Mapping[str, Artifact]) -> None:
        if not (inputs["model"].path / MODEL_FILE).is_file():
            raise PreconditionError(f"compile: {inputs['model'].path} holds no {MODEL_FILE}")

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        import tensorrt as trt

        from pipeline.targets import gpus

        cfg = self.config
        devices = gpus()
        if not devices:
            raise TargetUnavailable("compile: no NVIDIA GPU is visible to build the engine on")
        gpu = devices[0]
        settings = builder_settings(trt.__version__, cfg.optimization_level, cfg.workspace_mb)
        profile = Profile(
            min=(cfg.profile["min"][0], cfg.profile["min"][1]),
            opt=(cfg.profile["opt"][0], cfg.profile["opt"][1]),
            max=(cfg.profile["max"][0], cfg.profile["max"][1]),
        )
        cache_file = (
            timing_cache_path(ctx.artifacts_root, trt.__version__, gpu.name)
            if cfg.timing_cache and ctx.artifacts_root is not None
            else None
        )
        cache = cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else b""
        source = inputs["model"].path
        start = time.perf_counter()
        with ctx.progress.task(f"tensorrt {cfg.variant}", total=1) as advance:
            engine, updated, names = build_engine(
                source / MODEL_FILE, profile, settings, cache if cfg.timing_cache else None
            )
            advance(1)
        seconds = time.perf_counter() - start
        folder = out / "engine"
        folder.mkdir(parents=True)
        # The tokenizer and config travel with the engine; the ONNX graph stays in its stage.
        for item in source.iterdir():
            if item.is_file() and item.suffix != ".onnx" and not item.name.endswith(".data"):
                shutil.copyfile(item, folder / item.name)
        (folder / ENGINE_FILE).write_bytes(engine)
        meta = EngineMetadata(
            tensorrt_version=trt.__version__,
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            precision=cfg.precision,
            onnx_sha256=sha256_path(source / MODEL_FILE),
            inputs=names,
            profile=profile.as_dict(),
            settings=settings,
        )
        (folder / METADATA_FILE).write_text(meta.model_dump_json(indent=2) + "\n", encoding="utf-8")
        if cache_file is not None and updated:
            write_bytes_atomic(cache_file, updated)
        return StageResult(
            outputs={"engine": "engine"},
            stats={
                "tensorrt": trt.__version__,
                "gpu": gpu.name,
                "compute_capability": gpu.compute_capability,
                "engine_bytes": len(engine),
                "build_seconds": round(seconds, 3),
                "timing_cache_bytes": len(cache),
                "profile": profile.as_dict(),
                "settings": settings,
            },
        )

    def describe(self) -> str:
        return f"TensorRT engine for {self.config.variant} ({self.config.precision})"
