"""A decoder family at a real size (seeded random weights): decode steps, fused against as
exported.

* ``gpt2``: GPT-2-small (124M parameters). No rotary embedding: its attention, cache update
  included, becomes one GroupQueryAttention with as many key/value heads as heads, and its
  LayerNorms with their residual adds SkipLayerNormalization.
* ``qwen3``: Qwen3-0.6B's configuration (28 layers, hidden 1024, 16 query and 8 key/value heads
  of 128, vocabulary 151,936; 596M parameters). Each query and key head is RMS-normalised before
  the rotation; that normalisation stays before GroupQueryAttention.
* ``pythia``: Pythia-160M's configuration (GPT-NeoX: 12 layers, hidden 768, 12 heads of 64,
  vocabulary 50,304; 162M parameters). A quarter of each head is rotated, q/k/v come from one
  projection packed by head, and attention and MLP run side by side from one residual.

The exported graphs are fused as a decoder variant's default ``optimize: ort`` does, and
with every fusion but ``attention`` (what fusing the attention adds), and a decode step of
each is timed, interleaved, at batch 1 and 8, with the fused logits compared
against the unfused graphs' (teacher-forced, a batch whose last row is left-padded; as
``benchmarks.decoder_fusion_peer``). No trained weights of these sizes ship on PyPI: the
latency is the architecture's, the logit comparison the fusions' arithmetic.

    python -m benchmarks.family_fusions --family gpt2
    python -m benchmarks.family_fusions --family qwen3
    python -m benchmarks.family_fusions --family pythia
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.decoder_fusion_peer import measure
from benchmarks.decoders import gpt2_small

ROOT = Path(__file__).resolve().parents[1]


def qwen3_0_6b() -> Any:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    # Qwen3-0.6B's config.json; the cos/sin table is cut to 4,096 positions (tforge precomputes
    # it for every position the model declares: 40,960 would be 2 x 10.5 MB).
    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config).eval()


def distinct_norms(model: Any) -> Any:
    """``model`` with its norm weights and its biases drawn (seeded by the caller), as training
    leaves them, instead of ones and zeros: two equal LayerNorms of one input (GPT-NeoX's
    attention and MLP norms, as initialised) would be merged into one, a graph no trained
    model gives."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.02 * torch.randn_like(parameter))
    return model


def pythia_160m() -> Any:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    # Pythia-160M's config.json.
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
        },
        max_position_embeddings=2048,
        use_parallel_residual=True,
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return distinct_norms(GPTNeoXForCausalLM(config)).eval()


FAMILIES = {"gpt2": gpt2_small, "qwen3": qwen3_0_6b, "pythia": pythia_160m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from pipeline.decoders import export_decoder
    from pipeline.decoders.fuse import fuse_decoder
    from pipeline.recipe import DECODER_FUSIONS

    model = FAMILIES[args.family]()
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as work:
        exported = export_decoder(model, Path(work) / "export").folder
        del model
        sets = {
            "tforge": DECODER_FUSIONS,
            # What fusing the attention adds over the other fusions.
            "no-attention": tuple(f for f in DECODER_FUSIONS if f != "attention"),
        }
        fused = {
            name: fuse_decoder(
                exported,
                Path(work) / name,
                fusions,
                config.max_position_embeddings,
                config.vocab_size,
            )
            for name, fusions in sets.items()
        }
        folders = {"unfused": exported, **{name: Path(work) / name for name in sets}}
        figures = measure(folders, args.threads)
    from benchmarks.markdown import record

    record(
        f"{args.family}_fusions",
        {
            "command": f"python -m benchmarks.family_fusions --family {args.family}",
            "architecture": config.model_type,
            "layers": config.num_hidden_layers,
            "parameters": parameters,
            "threads": args.threads,
            "fused_ops": fused["tforge"]["fused_ops"]["decode"],
            "fallback": fused["tforge"]["fallback"],
            # The "but attention" row is that only if nothing else was dropped.
            "fallback_no_attention": fused["no-attention"]["fallback"],
            "results": figures,
        },
    )


if __name__ == "__main__":
    main()
