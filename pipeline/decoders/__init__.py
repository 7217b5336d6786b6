"""Decoder-only language models (GPT-2, Llama, Qwen2, Qwen3, Phi, GPT-NeoX families): export
into a prefill and a decode graph with the KV cache as explicit inputs and outputs, greedy
generation through them, and verification against PyTorch (per-step logits, greedy tokens).
"""

from pipeline.decoders.export import DecoderGraphs, export_decoder
from pipeline.decoders.generate import (
    OrtGenerator,
    Sampling,
    greedy_reference,
    perplexity,
    sampled_reference,
)
from pipeline.decoders.verify import compare_generation

__all__ = [
    "DecoderGraphs",
    "OrtGenerator",
    "Sampling",
    "compare_generation",
    "export_decoder",
    "greedy_reference",
    "perplexity",
    "sampled_reference",
]
