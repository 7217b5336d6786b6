"""The static-cache PyTorch contender of ``benchmarks.decoder_static`` generates eager PyTorch's
tokens (the figures it times are of the same computation), and its section renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def test_static_cache_generation_matches_the_dynamic_cache(tmp_path: Path) -> None:
    from benchmarks.decoder_static import NEW_TOKENS, StaticCacheGenerator
    from pipeline.decoders.generate import TorchGenerator
    from pipeline.decoders.load import load_decoder
    from tests.decoders.test_build import tiny_llama

    model, _ = load_decoder(str(tiny_llama(tmp_path / "llama")))
    ids = np.random.default_rng(0).integers(5, 600, size=(3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    eager = TorchGenerator(model).generate(ids, mask, NEW_TOKENS)
    static = StaticCacheGenerator(model, compiled=False)
    for _ in range(2):  # a fresh cache per generation
        out = static.generate(ids, mask, NEW_TOKENS)
        assert (out.tokens == eager.tokens).all()
        worst = max(np.abs(a - b).max() for a, b in zip(out.logits, eager.logits, strict=True))
        assert worst < 1e-4
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="unpadded"):
        static.generate(ids, mask, NEW_TOKENS)


def test_the_static_cache_section_renders() -> None:
    from benchmarks.markdown import decoder_static_section

    row = {"prefill_ms": 50.0, "decode_ms": 20.0, "speedup": 2.5, "token_match": 1.0}
    results = {
        name: {"b1": {**row, "first_call_s": 70.0}, "b8": {**row, "first_call_s": 80.0}}
        for name in ("pytorch", "pytorch-compiled", "fp32")
    }
    lines = decoder_static_section(
        {
            "command": "c",
            "run_id": "r",
            "torch": "2",
            "transformers": "5",
            "threads": 2,
            "runs": 5,
            "results": results,
        }
    )
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 4  # header and three contenders
    assert "PyTorch StaticCache + torch.compile" in table[2] and "tforge fp32" in table[3]
    assert "20.00 (2.50x)" in table[3] and "70.0 / 80.0" in table[3]
