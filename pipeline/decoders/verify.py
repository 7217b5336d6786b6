"""A compiled decoder against PyTorch: the same greedy tokens, and the logits of every step.

* ``token_match``: the fraction of generated positions where the compiled decoder's greedy token
  equals PyTorch's (positions after a first difference count as they fall: once the texts differ
  the rest usually differs too, which is the honest cost of a divergence);
* ``sequence_match``: the fraction of prompts whose whole continuation is identical;
* ``agreement``: with PyTorch's tokens fed to both (teacher forcing), the fraction of steps
  whose most likely next token is PyTorch's: one flipped near-tie costs one step here, not the
  rest of the text, so this is the stable figure of how often the two models decide alike;
* ``max_abs_error`` / ``mean_abs_error``: of the logits under teacher forcing, at PyTorch's
  ``top_k`` most likely tokens of each step (the tokens that decide the text; a build keeps
  those, not the whole vocabulary of every step);
* ``nonfinite_outputs``: NaN or infinite logits under teacher forcing (any is a failure);
* ``first_divergence``: per prompt, the first step where the tokens differ (None: never).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.decoders.generate import Generation


class Generator(Protocol):
    def step_logits(
        self, ids: np.ndarray, mask: np.ndarray, forced: np.ndarray | None, new_tokens: int
    ) -> Generation: ...


@dataclass(frozen=True)
class ReferenceBatch:
    """PyTorch's greedy continuation of one left-padded prompt batch."""

    ids: np.ndarray
    mask: np.ndarray
    #: ``[batch, new_tokens]`` PyTorch's greedy tokens.
    tokens: np.ndarray
    #: ``[batch, new_tokens, k]`` the k most likely tokens of each step, most likely first,
    #: and their logits.
    top_ids: np.ndarray
    top_logits: np.ndarray


def top_logits(steps: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest logits of each step (``[batch, vocab]`` each), most likely first:
    (ids, values), both ``[batch, steps, k]``."""
    stacked = np.stack(steps, axis=1)
    k = min(k, stacked.shape[-1])
    index = np.argpartition(-stacked, k - 1, axis=-1)[..., :k]
    values = np.take_along_axis(stacked, index, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return (
        np.take_along_axis(index, order, axis=-1).astype(np.int32),
        np.take_along_axis(values, order, axis=-1).astype(np.float32),
    )


def reference_batch(
    ids: np.ndarray, mask: np.ndarray, reference: Generation, k: int
) -> ReferenceBatch:
    top_ids, top_values = top_logits(reference.logits, k)
    return ReferenceBatch(ids, mask, reference.tokens, top_ids, top_values)


@dataclass(frozen=True)
class BatchFigures:
    same: np.ndarray  # [batch, steps] free-running token equal to PyTorch's
    agree: np.ndarray  # [batch, steps] teacher-forced argmax equal to PyTorch's token
    error: np.ndarray  # [batch, steps, k] |logit difference| at PyTorch's top-k tokens
    nonfinite: int


def teacher_forced(generator: Generator, ref: ReferenceBatch) -> tuple[np.ndarray, np.ndarray]:
    """With PyTorch's tokens fed (teacher forcing): the logits of every step
    (``[batch, steps, vocab]``) and their error at PyTorch's top-k tokens (``[batch, steps, k]``)."""
    forced = generator.step_logits(ref.ids, ref.mask, ref.tokens, ref.tokens.shape[1])
    ours = np.stack(forced.logits, axis=1)
    at_top = np.take_along_axis(ours, ref.top_ids.astype(np.int64), axis=-1)
    return ours, np.abs(at_top.astype(np.float64) - ref.top_logits.astype(np.float64))


def batch_figures(generator: Generator, ref: ReferenceBatch) -> BatchFigures:
    free = generator.step_logits(ref.ids, ref.mask, None, ref.tokens.shape[1])
    ours, error = teacher_forced(generator, ref)
    return BatchFigures(
        same=free.tokens == ref.tokens,
        agree=ours.argmax(axis=-1) == ref.tokens,
        error=error,
        nonfinite=int((~np.isfinite(ours)).sum()),
    )


def summarize(parts: list[BatchFigures]) -> dict[str, Any]:
    same = np.concatenate([p.same for p in parts])
    agree = np.concatenate([p.agree for p in parts])
    errors = [p.error for p in parts]
    finite = [e[np.isfinite(e)] for e in errors]
    values = np.concatenate(finite) if finite else np.zeros(0)
    return {
        "prompts": len(same),
        "new_tokens": int(same.shape[1]),
        "token_match": float(same.mean()),
        "sequence_match": float(same.all(axis=1).mean()),
        "agreement": float(agree.mean()),
        "max_abs_error": float(values.max()) if values.size else None,
        "mean_abs_error": float(values.mean()) if values.size else None,
        "nonfinite_outputs": int(sum(p.nonfinite for p in parts)),
        "first_divergence": [
            None if row.all() else int(np.argmin(row))  # the first False
            for row in same
        ],
    }


def compare_generation(
    generator: Generator, reference: Generation, ids: np.ndarray, mask: np.ndarray
) -> dict[str, Any]:
    """Every figure above for one batch whose full reference logits are at hand."""
    vocab = reference.logits[0].shape[-1]
    return summarize([batch_figures(generator, reference_batch(ids, mask, reference, vocab))])
