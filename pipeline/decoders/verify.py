"""A compiled decoder against PyTorch: the same greedy tokens, and the logits of every step.

* ``token_match``: the fraction of generated positions where the compiled decoder's greedy token
  equals PyTorch's (positions after a first difference count as they fall: once the texts differ
  the rest usually differs too, which is the honest cost of a divergence);
* ``sequence_match``: the fraction of prompts whose whole continuation is identical;
* ``max_logits_error`` / ``mean_logits_error``: with PyTorch's tokens fed to both (teacher
  forcing), so every step compares the same context and a single flipped token does not make
  the rest incomparable;
* ``first_divergence``: per prompt, the first step where the tokens differ (None: never).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.decoders.generate import Generation, OrtGenerator


def compare_generation(
    generator: OrtGenerator, reference: Generation, ids: np.ndarray, mask: np.ndarray
) -> dict[str, Any]:
    new_tokens = reference.tokens.shape[1]
    free = generator.generate(ids, mask, new_tokens)
    forced = generator.step_logits(ids, mask, reference.tokens, new_tokens)
    same = free.tokens == reference.tokens
    errors = [
        np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
        for ours, theirs in zip(forced.logits, reference.logits, strict=True)
    ]
    divergence = [
        None if row.all() else int(np.argmin(row))  # the first False
        for row in same
    ]
    return {
        "prompts": len(ids),
        "new_tokens": int(new_tokens),
        "token_match": float(same.mean()),
        "sequence_match": float(same.all(axis=1).mean()),
        "max_logits_error": float(max(e.max() for e in errors)),
        "mean_logits_error": float(np.mean([e.mean() for e in errors])),
        "first_divergence": divergence,
    }
