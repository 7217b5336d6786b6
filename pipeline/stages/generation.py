"""Stages of a text-generation build (decoder-only language models).

The steps keep the encoder pipeline's ids (``load``, ``export``, ``reference``,
``optimize[<variant>]``, ``quantize[<variant>]``, ``verify[<variant>]``, ``latency``), so
reports, checks and comparisons read both kinds of build alike; the stages behind them differ:

* ``load-decoder``: the float32 PyTorch model (a checkpoint folder, or GGUF weights dequantized
  by transformers) and ``decoder.json`` describing it;
* ``export-decoder``: ``prefill.onnx`` + ``decode.onnx`` with the KV cache as explicit inputs and
  outputs (see pipeline.decoders.export), plus the tokenizer and config;
* ``generation-reference``: PyTorch's greedy continuations of the evaluation prompts with the
  top-k logits of every step, and PyTorch's perplexity on the evaluation texts;
* ``generation-floor``: PyTorch itself in fp16 and bf16 against that reference: the accuracy a
  16-bit deployment of the model gives up, the scale a variant's figures read against;
* ``optimize-decoder``: normalisation, rotary, attention and projection-packing fusions on both
  graphs, each run against the unfused graphs before it is kept (see pipeline.decoders.fuse);
* ``quantize-decoder``: INT8 dynamic, or 8-/4-bit weight-only MatMulNBits, on both graphs;
* ``verify-generation``: a variant's greedy tokens, teacher-forced decisions and logits, and
  perplexity against the reference (see pipeline.decoders.verify);
* ``latency-generation``: time to first token (the prefill) and per-token decode latency of
  every variant beside PyTorch eager with its cache, interleaved, per batch and prompt length.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.artifacts import Artifact, size_of
from pipeline.backends.memory import MemoryProbe
from pipeline.backends.timing import SETTLE_AFTER_TORCH, LatencyStats
from pipeline.calibration import read_samples
from pipeline.errors import InputError
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.floor import FLOOR_DTYPES
from pipeline.stages.fp16 import CONVERSION_VERSION
from pipeline.stages.latency import (
    PYTORCH,
    TimingConfig,
    memory_stats,
    peak_memory,
    token_stream,
)

INFO_FILE = "decoder.json"
MODEL_DIR = "model"
REFERENCE_ARRAYS = "reference.safetensors"
REFERENCE_INDEX = "reference.json"


class DecoderInfo(BaseModel):
    """``decoder.json``: what later stages need to know about the decoder."""

    model_config = ConfigDict(frozen=True)

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab_size: int
    max_positions: int | None
    num_parameters: int
    #: Bytes of the float32 weights PyTorch holds (the reference's size).
    parameter_bytes: int
    #: The GGUF file the weights were dequantized from, if any.
    gguf: str | None
    tokenizer: dict[str, Any]

    @classmethod
    def read(cls, artifact: Artifact) -> DecoderInfo:
        return cls.model_validate_json(artifact.path.read_text(encoding="utf-8"))


def loaded_decoder(ctx: BuildContext, path: Path, threads: int | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a decoder checkpoint, loaded at most once per build."""
    import torch

    from pipeline.decoders.load import load_decoder

    if threads is not None:
        torch.set_num_threads(threads)
    loaded: tuple[Any, Any] = ctx.memo("decoder", str(path), lambda: load_decoder(path))
    return loaded


def loaded_tokenizer(ctx: BuildContext, path: Path) -> Any:
    """The tokenizer of a decoder checkpoint: the loaded model's when this build has it, else
    the tokenizer alone (a quantize step whose reference step was cached needs no model)."""
    from pipeline.decoders.load import load_tokenizer

    if ctx.has_memo("decoder", str(path)):
        return loaded_decoder(ctx, path)[1]
    return ctx.memo("tokenizer", str(path), lambda: load_tokenizer(path))


class LoadDecoderConfig(StageConfig):
    task: str


class LoadDecoderStage(Stage[LoadDecoderConfig]):
    name = "load-decoder"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        path = inputs["checkpoint"].path
        model, tokenizer = loaded_decoder(ctx, path)
        config = model.config
        heads = int(config.num_attention_heads)
        info = DecoderInfo(
            model_type=str(config.model_type),
            layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            vocab_size=int(config.vocab_size),
            max_positions=getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None),
            num_parameters=sum(p.numel() for p in model.parameters()),
            parameter_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            gguf=path.name if path.is_file() else None,
            tokenizer={
                "class": type(tokenizer).__name__,
                "pad_token": str(tokenizer.pad_token),
                "eos_token": str(tokenizer.eos_token),
                "vocab_size": len(tokenizer),
            },
        )
        if len(tokenizer) > info.vocab_size:
            raise InputError(
                f"{path}: the tokenizer has {len(tokenizer)} tokens but the model only "
                f"{info.vocab_size} embeddings",
                "pair the checkpoint with its own tokenizer",
            )
        (out / INFO_FILE).write_text(info.model_dump_json(indent=2), encoding="utf-8")
        note = (
            f"Weights dequantized from {info.gguf} to float32: that float model is the PyTorch "
            "reference every variant is compared with."
            if info.gguf
            else None
        )
        return StageResult(
            outputs={"info": INFO_FILE},
            stats={
                "model_type": info.model_type,
                "family": "decoder",
                "layers": info.layers,
                "hidden": info.hidden,
                "heads": info.heads,
                "kv_heads": info.kv_heads,
                "vocab_size": info.vocab_size,
                "parameters": info.num_parameters,
                "note": note,
            },
        )


def graph_nodes(folder: Path) -> dict[str, int]:
    import onnx

    from pipeline.decoders.export import DECODE, PREFILL

    return {
        name.removesuffix(".onnx"): len(
            onnx.load(str(folder / name), load_external_data=False).graph.node
        )
        for name in (PREFILL, DECODE)
    }


def decoder_size(folder: Path) -> int:
    """Bytes of both graphs and their weights (the deployable decoder, config files aside)."""
    from pipeline.decoders.export import graph_files

    return sum(size_of(f) for f in graph_files(folder))


class ExportDecoderConfig(StageConfig):
    opset: int


class ExportDecoderStage(Stage[ExportDecoderConfig]):
    name = "export-decoder"
    #: 2: weights stored once for both graphs.
    version = 2

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        from pipeline.decoders import export_decoder

        model, tokenizer = loaded_decoder(ctx, inputs["checkpoint"].path)
        with ctx.progress.task("export prefill and decode graphs", total=1) as advance:
            graphs = export_decoder(model, out / MODEL_DIR, opset=self.config.opset)
            advance(1)
        # What another tool needs beside the graphs to generate text with them.
        tokenizer.save_pretrained(str(graphs.folder))
        nodes = graph_nodes(graphs.folder)
        return StageResult(
            outputs={"model": MODEL_DIR},
            stats={
                "layers": graphs.layers,
                "nodes": nodes["decode"],
                "prefill_nodes": nodes["prefill"],
                "decode_nodes": nodes["decode"],
                "decode_inputs": len(graphs.decode_inputs),
                "size_bytes": decoder_size(graphs.folder),
            },
        )


def evaluation_texts(
    path: Path, text_field: str, count: int, kind: str = "evaluation"
) -> list[str]:
    """The first ``count`` texts of an evaluation (or ``kind``) file."""
    return [s.text for s in read_samples(path, kind=kind, text_field=text_field, limit=count)]


def encode_left_padded(
    tokenizer: Any, texts: list[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded token ids and mask of ``texts``, each cut to ``max_length`` tokens."""
    encoded = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"
    )
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


class GenerationReferenceConfig(StageConfig):
    prompts: int
    prompt_tokens: int
    new_tokens: int
    batch_size: int
    perplexity_texts: int
    max_length: int
    top_k: int
    text_field: str
    threads: int


class ReferenceSet:
    """The stored reference: prompt batches with PyTorch's continuations, and perplexity batches."""

    def __init__(self, folder: Path) -> None:
        from safetensors.numpy import load_file

        from pipeline.decoders.verify import ReferenceBatch

        self.index: dict[str, Any] = json.loads(
            (folder / REFERENCE_INDEX).read_text(encoding="utf-8")
        )
        arrays = load_file(str(folder / REFERENCE_ARRAYS))
        self.prompts = [
            ReferenceBatch(
                ids=arrays[f"prompt{i}/ids"],
                mask=arrays[f"prompt{i}/mask"],
                tokens=arrays[f"prompt{i}/tokens"],
                top_ids=arrays[f"prompt{i}/top_ids"],
                top_logits=arrays[f"prompt{i}/top_logits"],
            )
            for i in range(self.index["prompt_batches"])
        ]
        self.texts = [
            (arrays[f"text{i}/ids"], arrays[f"text{i}/mask"])
            for i in range(self.index["text_batches"])
        ]

    @property
    def perplexity(self) -> float:
        return float(self.index["perplexity"])


#: Texts per perplexity batch: the logits of every position over the vocabulary are held at once.
PERPLEXITY_BATCH = 8


class GenerationReferenceStage(Stage[GenerationReferenceConfig]):
    name = "generation-reference"
    # PyTorch's CPU kernels round differently per instruction set (as for encoders).
    facets = ("versions", "hardware")
    version = 2

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        from safetensors.numpy import save_file

        from pipeline.decoders.generate import (
            greedy_reference,
            negative_log_likelihood,
            torch_token_logits,
        )
        from pipeline.decoders.verify import top_logits

        cfg = self.config
        model, tokenizer = loaded_decoder(ctx, inputs["checkpoint"].path, cfg.threads)
        texts = evaluation_texts(
            inputs["evaluation"].path, cfg.text_field, max(cfg.prompts, cfg.perplexity_texts)
        )
        prompts = texts[: cfg.prompts]
        arrays: dict[str, np.ndarray] = {}
        prompt_batches = list(range(0, len(prompts), cfg.batch_size))
        text_batches = list(range(0, min(len(texts), cfg.perplexity_texts), PERPLEXITY_BATCH))
        with ctx.progress.task(
            "PyTorch reference", total=len(prompt_batches) + len(text_batches)
        ) as advance:
            for i, start in enumerate(prompt_batches):
                ids, mask = encode_left_padded(
                    tokenizer, prompts[start : start + cfg.batch_size], cfg.prompt_tokens
                )
                reference = greedy_reference(model, ids, mask, cfg.new_tokens)
                top_ids, top_values = top_logits(reference.logits, cfg.top_k)
                arrays |= {
                    f"prompt{i}/ids": ids,
                    f"prompt{i}/mask": mask,
                    f"prompt{i}/tokens": reference.tokens.astype(np.int64),
                    f"prompt{i}/top_ids": top_ids,
                    f"prompt{i}/top_logits": top_values,
                }
                advance(1)
            total, count, truncated = 0.0, 0, 0
            for i, start in enumerate(text_batches):
                chunk = texts[start : min(start + PERPLEXITY_BATCH, cfg.perplexity_texts)]
                lengths = [len(row) for row in tokenizer(chunk)["input_ids"]]
                truncated += sum(n > cfg.max_length for n in lengths)
                ids, mask = encode_left_padded(tokenizer, chunk, cfg.max_length)
                nll, n = negative_log_likelihood(torch_token_logits(model, ids, mask), ids, mask)
                total, count = total + nll, count + n
                arrays |= {f"text{i}/ids": ids, f"text{i}/mask": mask}
                advance(1)
        if count == 0:
            raise InputError(
                "the evaluation texts are too short to measure perplexity (one token each)",
                "give data.evaluation texts of at least two tokens",
            )
        perplexity = float(np.exp(total / count))
        index = {
            "prompt_batches": len(prompt_batches),
            "text_batches": len(text_batches),
            "prompts": len(prompts),
            "new_tokens": cfg.new_tokens,
            "perplexity": perplexity,
            "perplexity_tokens": count,
        }
        folder = out / "reference"
        folder.mkdir()
        save_file(arrays, str(folder / REFERENCE_ARRAYS))
        (folder / REFERENCE_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
        return StageResult(
            outputs={"reference": "reference"},
            stats={
                "prompts": len(prompts),
                "prompt_tokens": cfg.prompt_tokens,
                "new_tokens": cfg.new_tokens,
                "perplexity": round(perplexity, 6),
                "perplexity_texts": min(len(texts), cfg.perplexity_texts),
                "perplexity_tokens": count,
                "truncated": truncated,
                "max_length": cfg.max_length,
            },
        )


class OptimizeDecoderConfig(StageConfig):
    fusions: tuple[str, ...]
    #: Projections ``pack`` leaves apart: the variant's quantize.exclude patterns.
    separate: tuple[str, ...] = ()
    #: The session level the fused graphs are checked at (the variant's).
    session_optimization: str


class OptimizeDecoderStage(Stage[OptimizeDecoderConfig]):
    """Fused prefill and decode graphs; stats: the fused ops, what each fusion should have
    made for the architecture (``expected``), and any fusion dropped with its reason."""

    name = "optimize-decoder"
    #: 2: GPT-2's attention (no rotary) fused too; 3: Qwen3's (query and key heads normalised);
    #: 4: Phi's and GPT-NeoX's (partial rotary; GPT-NeoX's q/k/v packed by head).
    version = 4

    def describe(self) -> str:
        return f"optimize decoder ({', '.join(self.config.fusions) or 'no fusions'})"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        from pipeline.decoders.fuse import COUNTED, expected_ops, fuse_decoder

        info = DecoderInfo.read(inputs["info"])
        with ctx.progress.task("fuse prefill and decode graphs", total=1) as advance:
            result = fuse_decoder(
                inputs["model"].path,
                out / MODEL_DIR,
                self.config.fusions,
                info.max_positions,
                info.vocab_size,
                self.config.session_optimization,
                self.config.separate,
            )
            advance(1)
        decode = result["fused_ops"]["decode"]
        made = {
            fusion: sum(decode.get(op, 0) for op in ops)
            for fusion, ops in COUNTED.items()
            if fusion in self.config.fusions
        }
        apart = result["matched"].get("decode", {}).get("projections_kept_apart", 0)
        expected = {
            # Projection groups kept apart (quantize.exclude) are not packed.
            fusion: count - apart if fusion == "pack" else count
            for fusion, count in expected_ops(info.model_type, info.layers).items()
            if fusion in self.config.fusions
        }
        nodes = graph_nodes(out / MODEL_DIR)
        return StageResult(
            outputs={"model": MODEL_DIR},
            stats={
                "profile": "ort",
                # Fused op -> count in the decode graph (the report's Graph section).
                "fusions": decode,
                "made": made,
                "expected": expected,
                "kept": result["kept"],
                "fallback": result["fallback"],
                "matched": result["matched"],
                "prefill_fusions": result["fused_ops"]["prefill"],
                "nodes": nodes["decode"],
                "prefill_nodes": nodes["prefill"],
                "decode_nodes": nodes["decode"],
                "size_bytes": decoder_size(out / MODEL_DIR),
            },
        )


class QuantizeDecoderConfig(StageConfig):
    #: int8 (dynamic), int8-weight or int4 (weight-only MatMulNBits).
    method: str
    block_size: int
    exclude: tuple[str, ...]
    #: Weight-only: int8 or float products.
    compute: str = "int8"
    #: Weight-only: weights on a block grid are stored on it exactly.
    keep_grid: bool = False
    #: int8: 7-bit weights, where this CPU's INT8 products saturate (no VNNI).
    reduce_range: bool = False
    #: Calibration texts (the first ones) and tokens of each the sensitivity is measured on
    #: (0: not measured; the step then takes no checkpoint or calibration input).
    sensitivity_samples: int = 0
    sensitivity_tokens: int = 64
    text_field: str = "text"


#: Calibration texts a quantized decoder's sensitivity is measured on, in prompts per prefill
#: run (the calibration file is checked for as many before the build starts).
SENSITIVITY_SAMPLES = 16
SENSITIVITY_BATCH = 4


class QuantizeDecoderStage(Stage[QuantizeDecoderConfig]):
    """Quantized prefill and decode graphs; stats: what was quantized and kept float, and
    (unless the weights are kept on their own grid, which is exact) the most sensitive weight
    MatMuls by local SQNR on calibration text (``pipeline.decoders.quantize.decoder_sensitivity``).
    """

    name = "quantize-decoder"
    #: 2: a tied LM head is untied and quantized; 3: weights stored once for both graphs;
    #: 4: kept-float nodes named by node; 5: weights already on a grid are found (keep_grid);
    #: 6: per-MatMul sensitivity; GPT-2's rewritten Gemms keep their module names.
    version = 6

    def key_config(self) -> dict[str, Any]:
        config = super().key_config()
        if not config["reduce_range"]:
            del config["reduce_range"]  # 8-bit weights: the key of builds before the option
        return config

    def sensitivity(self, ctx: BuildContext, inputs: Mapping[str, Artifact]) -> list[Any]:
        """The most sensitive weight MatMuls, as the report lists them."""
        from pipeline.decoders.generate import positions
        from pipeline.decoders.quantize import decoder_sensitivity
        from pipeline.stages.quantize import SHOWN

        cfg = self.config
        tokenizer = loaded_tokenizer(ctx, inputs["checkpoint"].path)
        texts = evaluation_texts(
            inputs["calibration"].path, cfg.text_field, cfg.sensitivity_samples, "calibration"
        )
        feeds = []
        for start in range(0, len(texts), SENSITIVITY_BATCH):
            ids, mask = encode_left_padded(
                tokenizer, texts[start : start + SENSITIVITY_BATCH], cfg.sensitivity_tokens
            )
            feeds.append(
                {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
            )
        with ctx.progress.task(f"{cfg.method} sensitivity per MatMul", total=1) as advance:
            ranked = decoder_sensitivity(
                inputs["model"].path,
                feeds,
                cfg.method,  # type: ignore[arg-type]
                cfg.block_size,
                cfg.exclude,
                cfg.compute,
                reduce_range=cfg.reduce_range,
            )
            advance(1)
        return [s.as_dict() for s in ranked[:SHOWN]]

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        from pipeline.decoders.quantize import quantize_decoder

        cfg = self.config
        with ctx.progress.task(f"quantize {cfg.method}", total=1) as advance:
            graphs = quantize_decoder(
                inputs["model"].path,
                out / MODEL_DIR,
                cfg.method,  # type: ignore[arg-type]
                cfg.block_size,
                cfg.exclude,
                cfg.compute,
                cfg.keep_grid,
                reduce_range=cfg.reduce_range,
            )
            advance(1)
        decode = graphs["decode"]
        unmatched = sorted(set(decode["unmatched"]) & set(graphs["prefill"]["unmatched"]))
        if unmatched:
            raise InputError(
                f"quantize.exclude {unmatched} matches no weight MatMul of the decoder",
                "name modules as PyTorch does (lm_head, *.down_proj, model.layers.0.*) or ONNX nodes",
            )
        return StageResult(
            outputs={"model": MODEL_DIR},
            stats={
                "method": cfg.method,
                "block_size": cfg.block_size if cfg.method != "int8" else None,
                "compute": cfg.compute if cfg.method != "int8" else None,
                "weight_bits": (7 if cfg.reduce_range else 8) if cfg.method == "int8" else None,
                "weight_matmuls": decode["weight_matmuls"],
                "quantized_matmuls": decode["quantized"],
                "kept_float": [
                    {"node": node, "module": module}
                    for node, module in decode["kept_nodes"].items()
                ],
                "graphs": graphs,
                "size_bytes": decoder_size(out / MODEL_DIR),
            }
            | (
                {"grid": {k: decode["grid"][k] for k in ("bits", "corrected", "float")}}
                if cfg.keep_grid
                else {}
            )
            | ({"grid_found": decode["grid"]["found"]} if decode["grid"].get("found") else {})
            | ({"sensitivity": self.sensitivity(ctx, inputs)} if cfg.sensitivity_samples else {}),
        )


class HalfDecoderConfig(StageConfig):
    #: Op types kept in float32 (pipeline.decoders.half.DECODER_KEEP_FLOAT by default).
    keep_float: tuple[str, ...]


class HalfDecoderStage(Stage[HalfDecoderConfig]):
    """Float16 prefill and decode graphs with a float16 KV cache (pipeline.decoders.half)."""

    name = "fp16-decoder"
    version = CONVERSION_VERSION

    def describe(self) -> str:
        return "convert decoder to float16"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        from pipeline.decoders.half import half_decoder

        with ctx.progress.task("convert prefill and decode graphs to float16", 1) as advance:
            graphs = half_decoder(inputs["model"].path, out / MODEL_DIR, self.config.keep_float)
            advance(1)
        decode = graphs["decode"]
        return StageResult(
            outputs={"model": MODEL_DIR},
            stats={
                "casts": decode["casts"],
                "kept_float": decode["kept_float"],
                "cache": decode["cache"],
                "graphs": graphs,
                "size_bytes": decoder_size(out / MODEL_DIR),
            },
        )


class VerifyGenerationConfig(StageConfig):
    variant: str
    precision: str
    session_optimization: str
    threads: int


class VerifyGenerationStage(Stage[VerifyGenerationConfig]):
    name = "verify-generation"
    # MatMulNBits and INT8 kernels differ per instruction set (VNNI or not).
    facets = ("versions", "hardware")
    version = 2

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        from pipeline.decoders.generate import OrtGenerator

        cfg = self.config
        folder = inputs["model"].path
        reference = ReferenceSet(inputs["reference"].path)
        generator = OrtGenerator(folder, cfg.threads, cfg.session_optimization)
        figures = verified(ctx, f"verify {cfg.variant}", generator, reference)
        return StageResult(stats={**figures, "size_bytes": decoder_size(folder)})


def verified(
    ctx: BuildContext, label: str, generator: Any, reference: ReferenceSet
) -> dict[str, Any]:
    """A generator's figures against the reference: greedy tokens, teacher-forced decisions and
    logits of every prompt batch (pipeline.decoders.verify), and perplexity on the texts."""
    from pipeline.decoders.generate import negative_log_likelihood
    from pipeline.decoders.verify import batch_figures, summarize

    parts = []
    total, count = 0.0, 0
    with ctx.progress.task(label, total=len(reference.prompts) + len(reference.texts)) as advance:
        for batch in reference.prompts:
            parts.append(batch_figures(generator, batch))
            advance(1)
        for ids, mask in reference.texts:
            nll, n = negative_log_likelihood(generator.token_logits(ids, mask), ids, mask)
            total, count = total + nll, count + n
            advance(1)
    figures = summarize(parts)
    perplexity = float(np.exp(total / count)) if np.isfinite(total) else None
    divergences = [d for d in figures["first_divergence"] if d is not None]
    return {
        **figures,
        "error_kind": "logits at PyTorch's top-k tokens, teacher-forced",
        "diverged_prompts": len(divergences),
        "median_first_divergence": float(np.median(divergences)) if divergences else None,
        "perplexity": None if perplexity is None else round(perplexity, 6),
        "reference_perplexity": round(reference.perplexity, 6),
        "perplexity_increase": None
        if perplexity is None
        else round(perplexity / reference.perplexity - 1, 6),
    }


class GenerationFloorConfig(StageConfig):
    precisions: tuple[str, ...]
    threads: int


class GenerationFloorStage(Stage[GenerationFloorConfig]):
    """PyTorch itself in 16-bit precisions, verified against its FP32 reference like a variant.

    The model is cast whole (weights and every activation, as ``model.to(torch.float16)``
    deploys it) and generates through transformers' own cache, so the figures are what any
    16-bit deployment of this model gives up, with no compiler involved. Greedy token match is
    a chaotic figure (one flipped near-tie changes the rest of a text), and how often a model
    has near-ties depends on the model and the prompts: on SmolLM2-135M and the shipped
    evaluation prompts, PyTorch in fp16 keeps 0.948 of the tokens and in bf16 0.733
    (BENCHMARKS.md). The floor is the scale the variants' figures read against.
    """

    name = "generation-floor"
    # PyTorch's half-precision CPU kernels differ per instruction set (AMX, AVX512-FP16...).
    facets = ("versions", "hardware")
    version = 1

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        import copy

        import torch

        from pipeline.decoders.generate import TorchGenerator

        cfg = self.config
        model, _ = loaded_decoder(ctx, inputs["checkpoint"].path, cfg.threads)
        reference = ReferenceSet(inputs["reference"].path)
        stats: dict[str, Any] = {}
        for precision in cfg.precisions:
            # A copy: the float32 model is shared with the build's other stages.
            cast = copy.deepcopy(model).to(getattr(torch, FLOOR_DTYPES[precision]))
            figures = verified(ctx, f"PyTorch {precision}", TorchGenerator(cast), reference)
            del cast
            stats[precision] = {k: v for k, v in figures.items() if k != "first_divergence"}
        return StageResult(stats=stats)


def phase_key(phase: str, batch: int, sequence: int) -> str:
    """``prefill-b1s32`` (the whole prompt: time to first token) or ``decode-b1s32`` (per token)."""
    return f"{phase}-b{batch}s{sequence}"


def prompt_rows(stream: np.ndarray, batch: int, sequence: int, bos: int | None) -> np.ndarray:
    """``batch`` prompts of ``sequence`` real tokens each (BOS first, when the model has one)."""
    body = sequence - (bos is not None)
    need = batch * body
    rows = np.tile(stream, -(-need // stream.size))[:need].reshape(batch, body)
    if bos is not None:
        rows = np.concatenate([np.full((batch, 1), bos), rows], axis=1)
    return rows.astype(np.int64)


class GenerationLatencyConfig(TimingConfig):
    #: Tokens generated per timed run.
    new_tokens: int


class GenerationLatencyStage(Stage[GenerationLatencyConfig]):
    name = "latency-generation"
    facets = ("versions", "hardware")

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        from pipeline.decoders.generate import OrtGenerator, TorchGenerator

        cfg = self.config
        path = inputs["checkpoint"].path
        info = DecoderInfo.read(inputs["info"])
        model, tokenizer = loaded_decoder(ctx, path, cfg.threads)
        stream = token_stream(
            tokenizer, evaluation_texts(inputs["evaluation"].path, cfg.text_field, 10_000)
        )
        generators: dict[str, Any] = {PYTORCH: TorchGenerator(model)}
        folders = {name: inputs[f"model:{name}"].path for name in cfg.variants}
        for name, optimization in cfg.variants.items():
            generators[name] = OrtGenerator(folders[name], cfg.threads, optimization)

        results: dict[str, dict[str, Any]] = {name: {} for name in generators}
        bos = tokenizer.bos_token_id
        with ctx.progress.task("latency", total=len(cfg.shapes) * cfg.runs) as advance:
            for batch, sequence in cfg.shapes:
                ids = prompt_rows(stream, batch, sequence, bos)
                mask = np.ones_like(ids)
                prefill: dict[str, list[float]] = {name: [] for name in generators}
                decode: dict[str, list[float]] = {name: [] for name in generators}
                for _ in range(cfg.warmup):
                    for generator in generators.values():
                        generator.step_logits(ids, mask, None, min(4, cfg.new_tokens))
                # Round-robin: one whole generation per contender per round.
                for _ in range(cfg.runs):
                    for name, generator in generators.items():
                        times: list[float] = []
                        generator.step_logits(ids, mask, None, cfg.new_tokens, times=times)
                        prefill[name].append(times[0])
                        decode[name] += times[1:]
                        if name == PYTORCH:
                            time.sleep(SETTLE_AFTER_TORCH)
                    advance(1)
                for name in generators:
                    results[name][phase_key("prefill", batch, sequence)] = LatencyStats.of(
                        prefill[name], batch
                    ).as_dict()
                    # Throughput of a decode step is tokens per second (one per row).
                    results[name][phase_key("decode", batch, sequence)] = LatencyStats.of(
                        decode[name], batch
                    ).as_dict()
        shapes = [phase_key(p, b, s) for b, s in cfg.shapes for p in ("prefill", "decode")]
        stats: dict[str, Any] = {
            "pytorch_device": "cpu",
            "threads": cfg.threads,
            "warmup": cfg.warmup,
            "runs": cfg.runs,
            "new_tokens": cfg.new_tokens,
            "shapes": shapes,
            "contenders": results,
            "size_bytes": {
                PYTORCH: info.parameter_bytes,
                **{name: decoder_size(folder) for name, folder in folders.items()},
            },
        }
        if cfg.memory:
            batch, sequence = max(cfg.shapes, key=lambda bs: bs[0] * bs[1])
            ids = prompt_rows(stream, batch, sequence, bos)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            probes = {
                PYTORCH: MemoryProbe(
                    "pytorch-decoder", str(path), cfg.threads, new_tokens=cfg.new_tokens
                ),
                **{
                    name: MemoryProbe(
                        "onnxruntime-decoder",
                        str(folder),
                        cfg.threads,
                        optimization=cfg.variants[name],
                        new_tokens=cfg.new_tokens,
                    )
                    for name, folder in folders.items()
                },
            }
            stats.update(memory_stats(peak_memory(ctx, probes, feed)))
            stats["memory_shape"] = f"b{batch}s{sequence}, {cfg.new_tokens} new tokens"
        return StageResult(stats=stats)
