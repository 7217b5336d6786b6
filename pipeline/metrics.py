"""Accuracy of a variant against PyTorch: pure numpy, shared by verification and benchmarks.

Token-level errors are taken over real tokens only (the attention mask): what a model writes at
padded positions is never read by anything downstream, and differs legitimately between
runtimes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

POOLING_MODES = ("mean", "cls", "max", "last")


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """One vector per sequence from token embeddings ``[batch, seq, hidden]``.

    Padded positions are selected out, never multiplied by zero: whatever a runtime leaves
    there (NaN included) must not reach the pooled vector.
    """
    real = mask.astype(bool)
    rows = np.arange(hidden.shape[0])
    values = hidden.astype(np.float64)
    if mode == "cls":
        # The first real token: position 0 for right padding, later for left padding.
        return values[rows, np.argmax(real, axis=1)]
    if mode == "last":
        return values[rows, real.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)]
    if mode == "max":
        return np.where(real[..., None], values, -np.inf).max(axis=1)
    if mode != "mean":
        raise ValueError(f"unknown pooling {mode!r} (known: {', '.join(POOLING_MODES)})")
    total = np.where(real[..., None], values, 0.0).sum(axis=1)
    return total / np.clip(real.sum(axis=1), 1, None)[:, None]


def normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.clip(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12, None)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[n, d]`` arrays."""
    return np.sum(normalize(a) * normalize(b), axis=-1)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """For each row, the index of its most similar other row (cosine)."""
    unit = normalize(embeddings.astype(np.float64))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)


#: Cosine differences below this are numerical ties, not a different neighbour.
NEIGHBOUR_TIE = 1e-6


def neighbour_agreement(
    reference: np.ndarray, candidate: np.ndarray, tie: float = NEIGHBOUR_TIE
) -> float:
    """Fraction of rows whose nearest neighbour under ``candidate`` is also nearest under ``reference``.

    "Also nearest" allows a tie: the candidate's pick counts when, in the reference space, it is
    within ``tie`` of the reference's own best. Without that, texts with (near-)equal
    similarities flip neighbours on float round-off and an exact model reads as disagreeing.
    """
    if len(reference) < 2:
        return 1.0
    unit = normalize(reference.astype(np.float64))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    rows = np.arange(len(reference))
    best = similarity[rows, np.argmax(similarity, axis=1)]
    chosen = similarity[rows, nearest_neighbours(candidate)]
    return float(np.mean(chosen >= best - tie))


def token_errors(
    reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray
) -> tuple[float, float]:
    """Max and mean absolute error over real tokens of ``[batch, seq, ...]`` outputs.

    A NaN or infinity in the candidate makes both errors infinite: ``max`` would otherwise
    propagate NaN, and every comparison with NaN is false, so a broken model would pass.
    """
    valid = mask.astype(bool)
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))[valid]
    if diff.size and not np.all(np.isfinite(diff)):
        return float("inf"), float("inf")
    return float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0


def nonfinite(values: np.ndarray, mask: np.ndarray | None = None) -> int:
    """How many NaN or infinite values ``values`` holds (at real tokens when a mask is given)."""
    bad = ~np.isfinite(values)
    if mask is not None:
        bad = bad[mask.astype(bool)]
    return int(bad.sum())


def label_agreement(
    reference_logits: np.ndarray, candidate_logits: np.ndarray, mask: np.ndarray | None = None
) -> tuple[int, int]:
    """(matching, total) argmax labels; token-level when a mask is given."""
    same = np.argmax(reference_logits, axis=-1) == np.argmax(candidate_logits, axis=-1)
    if mask is not None:
        same = same[mask.astype(bool)]
    return int(same.sum()), int(same.size)


def word_labels(logits: np.ndarray, word_ids: Sequence[int | None]) -> list[int]:
    """Per-word predictions of a token-classification model: each word's first sub-token."""
    seen: set[int] = set()
    labels = []
    for position, word in enumerate(word_ids):
        if word is None or word in seen:
            continue
        seen.add(word)
        labels.append(int(np.argmax(logits[position])))
    return labels


def accuracy(predicted: Sequence[Any], expected: Sequence[Any]) -> tuple[int, int]:
    """(correct, total) over paired predictions."""
    pairs = list(zip(predicted, expected, strict=False))
    return sum(int(p == e) for p, e in pairs), len(pairs)
