"""Stage ``load``: check a checkpoint folder, load it for the task, describe it.

The PyTorch model is loaded once per build and shared through the build context; what the stage
stores is ``checkpoint.json``: architecture, graph inputs, pooling, tokenizer facts. Later stages
read it instead of re-deriving those facts, and their cache keys follow its hash.

Weights load from safetensors, or from ``pytorch_model.bin`` through ``torch.load`` with
``weights_only=True`` (transformers' loader); a pickle that holds anything but tensors is refused.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.architectures import ArchitectureSpec, is_decoder
from pipeline.artifacts import Artifact, sha256_file
from pipeline.backends.torch_backend import OUTPUT_NAME, VOCABULARY_FILES, LoadedModel, load_model
from pipeline.errors import InputError, RecipeError, read_json, read_text
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Files another tool needs beside model.onnx to use it (config and tokenizer): the
#: vocabulary in whichever form the checkpoint has it, and the tokenizer's settings.
TOKENIZER_FILES = (
    *VOCABULARY_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
)
_CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")


def resolve_source(source: str) -> Path:
    """The checkpoint folder for a recipe's ``model.source`` (a path, or ``package:<name>``)."""
    if source.startswith("package:"):
        distribution = source.removeprefix("package:")
        module_name = distribution.replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise InputError(
                f"model package {distribution!r} is not installed", f"pip install {distribution}"
            ) from None
        getter = getattr(module, "get_model_path", None)
        folder = (
            Path(getter()) if callable(getter) else Path(module.__file__ or "").parent / "model"
        )
    else:
        folder = Path(source).expanduser()
    if not folder.exists():
        raise InputError(
            f"model path {folder} does not exist", "pass a Hugging Face checkpoint folder"
        )
    if not folder.is_dir():
        raise InputError(
            f"model path {folder} is a file, not a checkpoint folder",
            "pass the folder that holds config.json",
        )
    if not (folder / "config.json").is_file():
        raise InputError(
            f"{folder} has no config.json", "pass a folder saved by transformers' save_pretrained"
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise InputError(
            f"{folder} has no weights ({' or '.join(WEIGHT_FILES[::2])})",
            "copy the weights next to config.json",
        )
    return folder.resolve()


def checkpoint_files(folder: Path) -> list[Path]:
    """The files that make up a checkpoint (config, weights, tokenizer, pooling config)."""
    files = [
        p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES
    ]
    files += sorted(folder.glob("*_Pooling/config.json"))
    return files


def checkpoint_artifact(folder: Path) -> Artifact:
    """A checkpoint's identity: the hash of its files (not of READMEs or other clutter)."""
    import hashlib

    digest = hashlib.sha256()
    size = 0
    for file in checkpoint_files(folder):
        digest.update(
            file.relative_to(folder).as_posix().encode()
            + b"\0"
            + sha256_file(file).encode()
            + b"\n"
        )
        size += file.stat().st_size
    return Artifact(name="checkpoint", path=folder, sha256=digest.hexdigest(), size=size)


class CheckpointInfo(BaseModel):
    """``checkpoint.json``: what later stages need to know about the checkpoint."""

    model_config = ConfigDict(frozen=True)

    task: str
    architecture: dict[str, Any]
    inputs: list[str]
    output: str
    pooling: str
    max_length: int | None
    num_parameters: int
    labels: dict[str, int] | None
    num_labels: int | None
    missing_head_weights: list[str]
    tokenizer: dict[str, Any]

    @classmethod
    def read(cls, artifact: Artifact) -> CheckpointInfo:
        return cls.model_validate_json(artifact.path.read_text(encoding="utf-8"))


#: sentence-transformers pooling flags -> our pooling. mean_sqrt_len differs from mean only by
#: a per-text scale, which cosine and nearest neighbours ignore.
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


def _pooling(folder: Path, requested: str) -> str:
    """``auto``: the sentence-transformers pooling config beside the checkpoint, else mean."""
    if requested != "auto":
        return requested
    for config_path in sorted(folder.glob("*_Pooling/config.json")):
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(
                f"{config_path} is not valid JSON ({error})", "fix it, or set model.pooling"
            ) from None
        modes = sorted(
            {_POOLING_FLAGS[k] for k, v in config.items() if v is True and k in _POOLING_FLAGS}
        )
        unknown = sorted(
            k
            for k, v in config.items()
            if v is True and k.startswith("pooling_mode_") and k not in _POOLING_FLAGS
        )
        if unknown or len(modes) != 1:
            raise InputError(
                f"{config_path} asks for pooling {unknown or modes}, which tforge does not compare on",
                "set model.pooling to mean, cls, max or last in the recipe",
            )
        return modes[0]
    return "mean"


def loaded_model(ctx: BuildContext, folder: Path, task: str) -> LoadedModel:
    """The checkpoint's PyTorch model and tokenizer, loaded at most once per build."""
    model: LoadedModel = ctx.memo("model", f"{folder}|{task}", lambda: load_model(folder, task))
    return model


class LoadConfig(StageConfig):
    task: str
    pooling: str


class LoadStage(Stage[LoadConfig]):
    name = "load"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        folder = inputs["checkpoint"].path
        config_path = folder / "config.json"
        config = read_json(read_text(config_path, "a config.json"), str(config_path))
        if not isinstance(config, dict):
            raise InputError(f"{folder}/config.json is not a JSON object")
        if is_decoder(config):
            # The encoder export of a causal LM keeps attention as a function ONNX Runtime
            # cannot load (SDPA), so it would fail at verification, minutes later.
            saved_as = ", ".join(config.get("architectures") or []) or "a causal LM"
            raise RecipeError(
                f"{folder}: {config.get('model_type')} is a decoder (saved as {saved_as}); "
                f"decoders build with task text-generation, and decoder-based "
                f"{self.config.task} models are not built yet",
                "build it with task text-generation (model.task, or --task text-generation)",
            )
        try:
            arch = ArchitectureSpec.from_config(config)
        except InputError as error:
            raise InputError(f"{folder}: {error.message}", error.hint) from None
        loaded = loaded_model(ctx, folder, self.config.task)
        tokenizer = loaded.tokenizer
        if tokenizer.pad_token is None:
            raise InputError(
                f"{folder}: the tokenizer has no padding token, so batches cannot be verified",
                "set pad_token in tokenizer_config.json",
            )
        limits = [
            n
            for n in (arch.max_positions and arch.max_positions - arch.family.position_offset,)
            if n
        ]
        model_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(model_max, int) and 0 < model_max < 1_000_000:
            limits.append(model_max)
        classifier = self.config.task != "feature-extraction"
        labels = config.get("label2id") if classifier else None
        info = CheckpointInfo(
            task=self.config.task,
            architecture=arch.summary(),
            inputs=list(arch.graph_inputs(list(tokenizer.model_input_names))),
            output=OUTPUT_NAME[self.config.task],
            pooling=_pooling(folder, self.config.pooling)
            if self.config.task == "feature-extraction"
            else "none",
            max_length=min(limits) if limits else None,
            num_parameters=sum(p.numel() for p in loaded.model.parameters()),
            labels={str(k): int(v) for k, v in labels.items()}
            if isinstance(labels, dict)
            else None,
            num_labels=int(loaded.model.config.num_labels) if classifier else None,
            missing_head_weights=loaded.missing_keys,
            tokenizer={
                "class": type(tokenizer).__name__,
                "fast": bool(getattr(tokenizer, "is_fast", False)),
                "pad_token": str(tokenizer.pad_token),
                "vocab_size": int(getattr(tokenizer, "vocab_size", 0) or 0),
            },
        )
        (out / "checkpoint.json").write_text(info.model_dump_json(indent=2), encoding="utf-8")
        return StageResult(
            outputs={"info": "checkpoint.json"},
            stats={
                "model_type": arch.model_type,
                "family": arch.family.name,
                "layers": arch.layers,
                "hidden": arch.hidden,
                "heads": arch.heads,
                "parameters": info.num_parameters,
                "inputs": info.inputs,
                "pooling": info.pooling,
                "note": arch.family.note,
            },
        )
