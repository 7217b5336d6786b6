"""PyTorch: load a checkpoint for a task, wrap it for export, run it eagerly."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import InputError, RecipeError, first_line

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: A tokenizer's vocabulary, in one of its saved forms (tokenizer_config.json alone has none).
VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "spm.model",
    "sentencepiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
#: Tasks whose output is a trained head on top of the encoder.
HEAD_TASKS = ("sequence-classification", "token-classification")

AUTO_CLASSES = {
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
}
OUTPUT_NAME = {
    "feature-extraction": "last_hidden_state",
    "sequence-classification": "logits",
    "token-classification": "logits",
}


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, in eval mode
    tokenizer: Any
    #: Weights the task head needed but the checkpoint lacks (initialised at random).
    missing_keys: list[str]


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_model(folder: Path, task: str) -> LoadedModel:
    """Load a local checkpoint for ``task``; unsafe or broken weights become InputError."""
    _quiet_transformers()
    import transformers
    from safetensors import SafetensorError

    auto = getattr(transformers, AUTO_CLASSES[task])
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        # AutoTokenizer does not fail here: it makes an empty tokenizer that reads every word
        # as [UNK], and PyTorch and ONNX then agree on texts that are all one token.
        raise InputError(
            f"{folder} has no tokenizer vocabulary ({', '.join(VOCABULARY_FILES)})",
            "save the tokenizer beside the weights: tokenizer.save_pretrained(folder)",
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # The tokenizers library raises a bare Exception for a damaged tokenizer.json, so this one
    # call catches everything: any failure here means "these tokenizer files are unusable".
    except Exception as error:
        raise InputError(
            f"{folder}: the tokenizer cannot be loaded ({first_line(error)})",
            "the folder needs tokenizer files (tokenizer.json or vocab files) saved by save_pretrained",
        ) from None
    try:
        model, info = auto.from_pretrained(
            folder, local_files_only=True, output_loading_info=True, dtype="float32"
        )
    except pickle.UnpicklingError:
        raise InputError(
            f"{folder}: the pickle checkpoint holds Python objects besides tensors; tforge refuses to unpickle it, "
            "because unpickling runs arbitrary code",
            "convert it to safetensors with a tool you trust (model.save_pretrained(..., safe_serialization=True))",
        ) from None
    except SafetensorError as error:
        raise InputError(
            f"{folder}: the safetensors weights are damaged or truncated ({first_line(error)})",
            "copy the checkpoint again",
        ) from None
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise InputError(
            f"{folder}: the weights cannot be loaded for {task} ({first_line(error)})"
        ) from None
    model.eval()
    missing = sorted(info.get("missing_keys", []))
    if missing and task in HEAD_TASKS:
        # Both PyTorch and ONNX would run the same random head, so every check would pass on a
        # model that classifies nothing.
        trained = ", ".join(getattr(model.config, "architectures", None) or []) or "unknown"
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise RecipeError(
            f"{folder}: the checkpoint lacks weights {task} uses ({shown} are not in it and "
            f"would start random; it was saved as {trained})",
            "set model.task (or --task) to what the checkpoint was trained for: "
            "feature-extraction for a bare encoder, text-generation for a causal LM",
        )
    if missing:
        log.warning(
            "%s: %d weights are not in the checkpoint and start random (unused by %s)",
            folder,
            len(missing),
            task,
        )
    return LoadedModel(model=model, tokenizer=tokenizer, missing_keys=missing)


def task_module(model: Any, task: str, inputs: tuple[str, ...]) -> torch.nn.Module:
    """A module whose forward takes exactly the graph inputs and returns the task's one output."""
    import torch

    output = OUTPUT_NAME[task]

    class TaskModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            kwargs = {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
            }
            return getattr(self.model(**{k: v for k, v in kwargs.items() if k in inputs}), output)

    return TaskModule().eval()


class TorchRunner:
    """Eager PyTorch: the reference every variant is compared and timed against.

    On the CPU by default; with ``device="cuda"`` (a build with GPU variants) a copy of the
    module runs on the GPU, inputs are moved there in ``prepare`` and ``call`` synchronises, so
    its timing is comparable with the GPU variants'. With ``dtype`` float16 or bfloat16, a copy
    cast whole (weights and every activation, as ``model.to(torch.float16)`` deploys it) runs;
    its outputs come back as float32.
    """

    name = "pytorch"

    def __init__(
        self,
        module: torch.nn.Module,
        output_name: str,
        threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        owned: bool = False,
    ) -> None:
        import copy

        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.device = device
        # The float32 CPU module is shared within a build (the reference stage's); a GPU or a
        # cast gets a copy, unless the caller hands the module over (``owned``: the memory
        # probe's fresh process), where it moves in place as a deployment's model.to() does; a
        # copy would hold the weights twice in host memory and overstate PyTorch's peak RSS.
        shared = device == "cpu" and dtype == "float32"
        target = module if shared or owned else copy.deepcopy(module)
        self.module = (
            target if shared else target.to(device=device, dtype=getattr(torch, dtype))
        ).eval()
        self.output_name = output_name

    def prepare(self, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        return {
            name: torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
            for name, array in feed.items()
        }

    def call(self, prepared: dict[str, Any]) -> Any:
        import torch

        with torch.inference_mode():
            result = self.module(**prepared)
        if self.device != "cpu":
            torch.cuda.synchronize()
        return result

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.output_name: self.call(self.prepare(feed)).float().cpu().numpy()}
