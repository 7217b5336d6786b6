"""Greedy generation through the prefill and decode graphs, with the KV cache threaded between steps.

Batches are left-padded (the tokenizer convention for generation): the attention mask marks the
padding, position ids count real tokens only (``cumsum(mask) - 1``, as transformers' ``generate``
does), and every decode step appends a 1 to the mask. The reference is PyTorch's own
``generate`` (greedy), with the logits of every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding with a fixed seed: temperature, then the ``top_k`` most likely tokens.

    The draw uses NumPy's seeded generator on float64 probabilities, so two runtimes whose
    logits agree closely draw the same tokens from the same seed.
    """

    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def choose(
    logits: np.ndarray, sampling: Sampling | None, rng: np.random.Generator | None
) -> np.ndarray:
    """The next token per row: argmax, or a seeded draw from the top-k softmax."""
    if sampling is None or rng is None:
        return np.argmax(logits, axis=-1)
    scaled = logits.astype(np.float64) / max(sampling.temperature, 1e-6)
    k = min(sampling.top_k, scaled.shape[-1])
    top = np.argsort(-scaled, axis=-1, kind="stable")[:, :k]
    picked = np.take_along_axis(scaled, top, axis=-1)
    probs = np.exp(picked - picked.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    draws = rng.random(len(logits))
    index = np.minimum((np.cumsum(probs, axis=-1) < draws[:, None]).sum(axis=-1), k - 1)
    return top[np.arange(len(top)), index]


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded batch: real tokens count from 0, padding gets 1."""
    position = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, position).astype(np.int64)


def decode_loop(
    prefill: Callable[[dict[str, np.ndarray]], Any],
    step: Callable[[dict[str, np.ndarray], Any], Any],
    last_logits: Callable[[Any], np.ndarray],
    ids: np.ndarray,
    mask: np.ndarray,
    forced: np.ndarray | None,
    new_tokens: int,
    sampling: Sampling | None,
    times: list[float] | None,
) -> Generation:
    """The generation loop every runtime shares: the prefill on the prompt, then one decode
    step per new token with the cache of the previous call (``step(feed, previous output)``).

    The mask grows by one column per step and positions count real tokens only, so left-padded
    rows continue where their text ends. ``times`` receives each model call's seconds (the
    prefill first); reading the logits out is not timed.
    """

    def timed(call: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        out = call(*args)
        if times is not None:
            times.append(time.perf_counter() - start)
        return out

    mask = mask.astype(np.int64)
    out = timed(
        prefill,
        {
            "input_ids": ids.astype(np.int64),
            "attention_mask": mask,
            "position_ids": positions(mask),
        },
    )
    tokens, steps = [], []
    rng = sampling.rng() if sampling is not None else None
    for index in range(new_tokens):
        logits = last_logits(out)
        steps.append(logits)
        chosen = choose(logits, sampling, rng) if forced is None else forced[:, index]
        tokens.append(chosen)
        if index == new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
        feed = {
            "input_ids": chosen[:, None].astype(np.int64),
            "attention_mask": mask,
            "position_ids": (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64),
        }
        out = timed(step, feed, out)
    return Generation(tokens=np.stack(tokens, axis=1), logits=steps)


class StepGenerator:
    """What every runtime's generator shares: :func:`decode_loop` over its own prefill call,
    decode-step call and logits reader (:meth:`calls`)."""

    def calls(self) -> tuple[Callable[..., Any], Callable[..., Any], Callable[[Any], np.ndarray]]:
        raise NotImplementedError

    def step_logits(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        forced: np.ndarray | None,
        new_tokens: int,
        sampling: Sampling | None = None,
        times: list[float] | None = None,
    ) -> Generation:
        """Generate ``new_tokens`` greedily; with ``forced`` (``[batch, new_tokens]``), feed
        those tokens instead of the argmax (teacher forcing: the logits of each step are then
        comparable with another runtime's even after their tokens diverge). ``times``, when
        given, receives the seconds of each model call (the prefill first)."""
        prefill, step, last_logits = self.calls()
        return decode_loop(
            prefill, step, last_logits, ids, mask, forced, new_tokens, sampling, times
        )

    def generate(
        self, ids: np.ndarray, mask: np.ndarray, new_tokens: int, sampling: Sampling | None = None
    ) -> Generation:
        return self.step_logits(ids, mask, None, new_tokens, sampling)


class OrtGenerator(StepGenerator):
    """ONNX Runtime sessions over a decoder's prefill and decode graphs."""

    def __init__(self, folder: Path, threads: int = 1, optimization: str = "all") -> None:
        from pipeline.backends.onnxruntime_backend import OrtRunner

        self.prefill = OrtRunner(folder / PREFILL, threads, optimization, name="prefill")
        self.decode = OrtRunner(folder / DECODE, threads, optimization, name="decode")
        self.layers = sum(1 for n in self.decode.input_names if n.endswith(".key"))

    def _feed(self, runner: Any, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: values[name] for name in runner.input_names}

    def calls(self) -> tuple[Callable[..., Any], Callable[..., Any], Callable[[Any], np.ndarray]]:
        def step(feed: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            for layer in range(self.layers):
                for kind in ("key", "value"):
                    feed[f"past.{layer}.{kind}"] = out[f"present.{layer}.{kind}"]
            return self.decode.run(self._feed(self.decode, feed))

        return (
            lambda feed: self.prefill.run(self._feed(self.prefill, feed)),
            step,
            lambda out: out["logits"][:, -1, :],
        )

    def token_logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Logits at every position of the prompt (the prefill graph alone)."""
        values = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
        return self.prefill.run(self._feed(self.prefill, values))["logits"]


def negative_log_likelihood(
    logits: np.ndarray, ids: np.ndarray, mask: np.ndarray
) -> tuple[float, int]:
    """(sum of -log p, count) of each next real token given the ones before it: batches add up."""
    shifted = logits[:, :-1].astype(np.float64)
    targets = ids[:, 1:]
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    top = shifted.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted - top).sum(axis=-1)) + top[..., 0]
    picked = np.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
    return float((log_z - picked)[valid].sum()), int(valid.sum())


def perplexity(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    """exp(mean negative log-likelihood) of each next real token given the ones before it."""
    total, count = negative_log_likelihood(logits, ids, mask)
    return float(np.exp(total / max(count, 1)))


def torch_token_logits(model: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """PyTorch's logits at every position of a (left-padded) batch."""
    import torch

    with torch.inference_mode():
        out = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(positions(mask)),
        )
    return out.logits.float().numpy()


class TorchGenerator(StepGenerator):
    """PyTorch eager with transformers' cache, in the same prefill / decode-step split and with
    the same sampler as :class:`OrtGenerator`: the reference for sampled decoding (transformers'
    own sampler draws from torch's generator, which no other runtime reproduces) and the
    baseline the decoder latency is timed against."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def token_logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Logits at every position of the prompt, as float32."""
        return torch_token_logits(self.model, ids, mask)

    def calls(self) -> tuple[Callable[..., Any], Callable[..., Any], Callable[[Any], np.ndarray]]:
        import torch

        def call(feed: dict[str, np.ndarray], **extra: Any) -> Any:
            tensors = {name: torch.from_numpy(value) for name, value in feed.items()}
            with torch.inference_mode():
                return self.model(**tensors, **extra, use_cache=True)

        return (
            call,
            # transformers 5: `past_key_values` is a deprecated alias of `cache`
            lambda feed, out: call(feed, cache=out.cache),
            lambda out: out.logits[:, -1, :].float().numpy(),
        )


def sampled_reference(
    model: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int, sampling: Sampling
) -> Generation:
    """PyTorch with the same sampler and seed as :class:`OrtGenerator`."""
    return TorchGenerator(model).step_logits(ids, mask, None, new_tokens, sampling)


def greedy_reference(model: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> Generation:
    """PyTorch ``generate``, greedy, exactly ``new_tokens`` tokens, with each step's logits.

    No end-of-text token stops it, and none is suppressed: every step takes the argmax of the
    raw logits, as the compiled decoder's greedy loop does. (``min_new_tokens`` would instead
    mask the end-of-text token out of the choice while a continuation is short, and a trained
    model that wants to end its text would then be judged against a token it did not choose.)
    """
    import torch

    with torch.inference_mode():
        result = model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            max_new_tokens=new_tokens,
            eos_token_id=None,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = result.sequences[:, ids.shape[1] :].numpy()
    if tokens.shape[1] != new_tokens:
        raise RuntimeError(f"generate made {tokens.shape[1]} tokens, not {new_tokens}")
    return Generation(tokens=tokens, logits=[step.float().numpy() for step in result.logits])
