"""ONNX Runtime sessions: a feed bound once (IOBinding) and called repeatedly, as timing does."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.backends.onnxruntime_backend import OrtRunner
from pipeline.stages.export import MODEL_FILE


def test_a_bound_feed_computes_what_run_computes(fused_bert) -> None:
    runner = OrtRunner(fused_bert / MODEL_FILE, 1, "basic")
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 90, (3, 10)).astype(np.int64)
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }
    want = runner.run(feed)["last_hidden_state"]
    prepared = runner.prepare(feed)
    first = runner.fetch(runner.call(prepared))[0]
    second = runner.fetch(runner.call(prepared))[0]
    assert first.shape == (3, 10, 32)
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(second, want)
    # Each call's outputs are its own: a later call does not write into what was fetched.
    first[:] = 0
    np.testing.assert_array_equal(runner.fetch(runner.call(prepared))[0], want)
    with pytest.raises(KeyError, match=r"needs inputs \['token_type_ids'\]"):
        runner.prepare({k: v for k, v in feed.items() if k != "token_type_ids"})
