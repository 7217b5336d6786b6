"""Calibration text as model feeds: tokenised with the model's own tokenizer, in batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TokenBatches:
    feeds: list[dict[str, np.ndarray]]
    #: Texts longer than ``max_length`` tokens, cut to it.
    truncated: int
    #: Real (non-padding) tokens over all batches.
    tokens: int


def token_batches(
    tokenizer: Any, texts: Sequence[str], inputs: Sequence[str], batch_size: int, max_length: int
) -> TokenBatches:
    """Batches of ``batch_size`` texts, each padded to its longest text (int64 feeds).

    Each batch is calibrated on its own (see the calibrate stage), so batches may differ in
    length: no method needs one fixed shape, and short texts are not padded to ``max_length``.
    """
    lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
    feeds = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        feeds.append({name: encoded[name].astype(np.int64) for name in inputs})
    return TokenBatches(
        feeds=feeds,
        truncated=sum(n > max_length for n in lengths),
        tokens=sum(min(n, max_length) for n in lengths),
    )
