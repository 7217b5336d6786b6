"""``benchmarks.decoder_rounding``: the int8 blocks hold what MatMulNBits' 8-bit blocks hold, the
rounded model computes with them, and putting it back restores the float32 model exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_int8_blocks_round_each_block_onto_its_own_grid() -> None:
    import torch

    from benchmarks.decoder_rounding import int8_blocks

    torch.manual_seed(0)
    x = torch.randn(3, 64)
    x[0, :16] = 0  # an all-zero block stays zero
    q = int8_blocks(x)
    blocks, rounded = x.reshape(3, 4, 16), q.reshape(3, 4, 16)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(rounded[0, 0], torch.zeros(16))
    # Each value within half a step of its block's grid, and on it.
    assert ((rounded - blocks).abs() <= step / 2 + 1e-7).all()
    levels = (rounded[:, 1:] / step[:, 1:]).flatten()
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    # The largest magnitude of a block is a level exactly (+-127 steps).
    assert torch.allclose(rounded.abs().amax(-1)[:, 1:], blocks.abs().amax(-1)[:, 1:])


def test_the_rounded_model_computes_with_the_rounding_and_resets(tmp_path: Path) -> None:
    import torch

    from benchmarks.decoder_rounding import Rounded, cast, forced_error, int8_blocks
    from pipeline.decoders.generate import TorchGenerator, greedy_reference
    from pipeline.decoders.load import load_decoder
    from pipeline.decoders.verify import reference_batch
    from tests.decoders.test_build import LAYERS, tiny_llama

    model, _ = load_decoder(str(tiny_llama(tmp_path / "llama")))
    ids = np.random.default_rng(0).integers(5, 600, size=(4, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    batch = reference_batch(ids, mask, greedy_reference(model, ids, mask, 6), 8)
    rounded = Rounded(model)
    groups = rounded.groups()
    # Per layer: attention and MLP; and the LM head.
    assert len(groups) == 2 * LAYERS + 1 and groups["lm_head"] == ["lm_head"]
    assert forced_error(model, batch) < 1e-5
    errors = {}
    for label, weights in (("fp16", cast("float16")), ("int8", int8_blocks)):
        rounded.round(rounded.linears, weights, weights)
        errors[label] = forced_error(model, batch)
        rounded.reset()
    assert 0 < errors["fp16"] < errors["int8"]
    # Reset: the float32 model again; the modules' own weights were never changed.
    assert all(torch.equal(m.weight, rounded.float_weights[n]) for n, m in rounded.linears.items())
    again = TorchGenerator(model).step_logits(ids, mask, batch.tokens, 6)
    assert (np.stack(again.logits, axis=1).argmax(-1) == batch.tokens).all()
    assert forced_error(model, batch) < 1e-5


def test_the_rounding_section_renders() -> None:
    from benchmarks.markdown import decoder_rounding_section

    entry = {
        "command": "python -m benchmarks.decoder_rounding --model m",
        "model": "m",
        "prompts": 64,
        "new_tokens": 32,
        "threads": 2,
        "rows": [
            {
                "rounding": "fp16 weights",
                "token_match": 0.98,
                "sequence_match": 0.97,
                "agreement": 0.999,
            }
        ],
        "most_sensitive": [{"group": "model.layers.29.mlp", "logit_error": 0.067}],
    }
    text = "\n".join(decoder_rounding_section(entry))
    assert "| fp16 weights | 0.980 | 0.970 | 0.9990 |" in text
    assert "model.layers.29.mlp 0.067" in text
