"""Greedy generation through the prefill and decode graphs, with the KV cache threaded between steps.

Batches are left-padded (the tokenizer convention for generation): the attention mask marks the
padding, position ids count real tokens only (``cumsum(mask) - 1``, as transformers' ``generate``
does), and every decode step appends a 1 to the mask. The reference is PyTorch's own
``generate`` (greedy), with the logits of every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.decoders.export import DECODE, PREFILL


@dataclass
class Generation:
    #: ``[batch, new_tokens]`` generated token ids.
    tokens: np.ndarray
    #: One ``[batch, vocab]`` array per step: the logits the step's token was chosen from.
    logits: list[np.ndarray]


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded batch: real tokens count from 0, padding gets 1."""
    position = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, position).astype(np.int64)


class OrtGenerator:
    """ONNX Runtime sessions over a decoder's prefill and decode graphs."""

    def __init__(self, folder: Path, threads: int = 1, optimization: str = "all") -> None:
        from pipeline.backends.onnxruntime_backend import OrtRunner

        self.prefill = OrtRunner(folder / PREFILL, threads, optimization, name="prefill")
        self.decode = OrtRunner(folder / DECODE, threads, optimization, name="decode")
        self.layers = sum(1 for n in self.decode.input_names if n.endswith(".key"))

    def _feed(self, runner: Any, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: values[name] for name in runner.input_names}

    def step_logits(
        self, ids: np.ndarray, mask: np.ndarray, forced: np.ndarray | None, new_tokens: int
    ) -> Generation:
        """Generate ``new_tokens`` greedily; with ``forced`` (``[batch, new_tokens]``), feed
        those tokens instead of the argmax (teacher forcing: the logits of each step are then
        comparable with another runtime's even after their tokens diverge)."""
        values: dict[str, np.ndarray] = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": mask.astype(np.int64),
            "position_ids": positions(mask),
        }
        out = self.prefill.run(self._feed(self.prefill, values))
        tokens, steps = [], []
        mask = mask.astype(np.int64)
        for step in range(new_tokens):
            logits = out["logits"][:, -1, :]
            steps.append(logits)
            chosen = np.argmax(logits, axis=-1) if forced is None else forced[:, step]
            tokens.append(chosen)
            if step == new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
            values = {
                "input_ids": chosen[:, None].astype(np.int64),
                "attention_mask": mask,
                "position_ids": (np.sum(mask, axis=1, keepdims=True) - 1).astype(np.int64),
            }
            for layer in range(self.layers):
                for kind in ("key", "value"):
                    values[f"past.{layer}.{kind}"] = out[f"present.{layer}.{kind}"]
            out = self.decode.run(self._feed(self.decode, values))
        return Generation(tokens=np.stack(tokens, axis=1), logits=steps)

    def generate(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> Generation:
        return self.step_logits(ids, mask, None, new_tokens)


def greedy_reference(model: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> Generation:
    """PyTorch ``generate``, greedy, exactly ``new_tokens`` tokens, with each step's logits."""
    import torch

    with torch.inference_mode():
        result = model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = result.sequences[:, ids.shape[1] :].numpy()
    return Generation(tokens=tokens, logits=[step.float().numpy() for step in result.logits])
