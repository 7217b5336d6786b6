"""GPT-2-small (random weights) decode steps, fused against as exported.

GPT-2 has no rotary embedding: its attention, cache update included, becomes one
GroupQueryAttention with as many key/value heads as heads, and its LayerNorms with their
residual adds SkipLayerNormalization. This exports GPT-2-small (124M parameters, seeded random
weights), fuses it as a decoder variant's default ``optimize: ort`` does, and times a decode step
of each, interleaved, at batch 1 and 8, with the fused logits compared against the unfused
graphs' (teacher-forced, a batch whose last row is left-padded; as
``benchmarks.decoder_fusion_peer``).

    python -m benchmarks.gpt2_fusions
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.decoder_fusion_peer import measure
from benchmarks.decoders import gpt2_small

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from pipeline.decoders import export_decoder
    from pipeline.decoders.fuse import fuse_decoder
    from pipeline.recipe import DECODER_FUSIONS

    model = gpt2_small()
    with tempfile.TemporaryDirectory() as work:
        exported = export_decoder(model, Path(work) / "export").folder
        fused = fuse_decoder(
            exported,
            Path(work) / "fused",
            DECODER_FUSIONS,
            model.config.n_positions,
            model.config.vocab_size,
        )
        figures = measure({"unfused": exported, "tforge": Path(work) / "fused"}, args.threads)
    from benchmarks.markdown import record

    record(
        "gpt2_fusions",
        {
            "command": "python -m benchmarks.gpt2_fusions",
            "threads": args.threads,
            "fused_ops": fused["fused_ops"]["decode"],
            "fallback": fused["fallback"],
            "results": figures,
        },
    )


if __name__ == "__main__":
    main()
