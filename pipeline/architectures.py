"""Per-architecture facts: sizes read from ``config.json``, inputs, tolerances, known limits.

One small declarative spec per family and one generic code path (as Optimum's exporter specs,
without inheritance-as-configuration). A family that is not listed still builds through the
generic spec, with its sizes read from the usual config attribute names; the report says that
no family spec was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import InputError

# Config attribute spellings differ between families (DistilBERT says n_layers/n_heads/dim).
_LAYER_KEYS = ("num_hidden_layers", "n_layers", "num_layers")
_HEAD_KEYS = ("num_attention_heads", "n_heads", "num_heads")
_HIDDEN_KEYS = ("hidden_size", "dim", "d_model")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")


@dataclass(frozen=True)
class Tolerance:
    """Default limits of the built-in parity check of a variant against PyTorch FP32."""

    max_abs_error: float
    min_mean_cosine: float
    min_agreement: float


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    #: Inputs the exported graph takes, in this order, when the tokenizer produces them.
    inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    #: Parity limits per precision; FP32 compares the same math in another runtime. INT8's
    #: limits catch a broken quantization (a wrong scale, an unquantizable op gone wrong), not
    #: the usual INT8 loss: accuracy a product needs is a gate in its recipe.
    tolerances: dict[str, Tolerance] = field(
        default_factory=lambda: {
            "fp32": Tolerance(max_abs_error=1e-4, min_mean_cosine=0.99999, min_agreement=0.99),
            # float16 keeps ~3 decimal digits: MiniLM 2.6e-3 max error, cosine 0.9999998.
            "fp16": Tolerance(max_abs_error=5e-2, min_mean_cosine=0.9999, min_agreement=0.97),
            # bfloat16 keeps 8 bits of mantissa (fp16: 11): MiniLM on OpenVINO 1.7e-2 max
            # error, cosine 0.99998, agreement 0.99.
            "bf16": Tolerance(max_abs_error=0.25, min_mean_cosine=0.999, min_agreement=0.95),
            "int8": Tolerance(max_abs_error=2.0, min_mean_cosine=0.98, min_agreement=0.75),
        }
    )
    #: Positions the embedding table reserves (RoBERTa counts from padding_idx + 1).
    position_offset: int = 0
    #: Fused ops one encoder layer should give, per fusion (see pipeline.passes.FUSED_OPS);
    #: a fusion missing here is not checked (no spec: nothing to expect).
    fusions: dict[str, int] = field(
        default_factory=lambda: {"attention": 1, "skip-layernorm": 2, "ffn": 1}
    )
    #: Said in the report when set (a family whose attention ONNX Runtime cannot fuse, say).
    note: str | None = None

    def expects(self, fusion: str) -> int:
        """Fused ops one layer should give for ``fusion`` (``mha`` is attention's other form)."""
        return self.fusions.get("attention" if fusion == "mha" else fusion, 0)


FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert",)),
    Family("distilbert", ("distilbert",), inputs=("input_ids", "attention_mask")),
    Family(
        "roberta",
        ("roberta", "camembert"),
        inputs=("input_ids", "attention_mask"),
        position_offset=2,
    ),
    Family(
        "xlm-roberta", ("xlm-roberta",), inputs=("input_ids", "attention_mask"), position_offset=2
    ),
    Family(
        "albert",
        ("albert",),
        fusions={"attention": 1, "skip-layernorm": 2, "ffn": 0},
        note="ALBERT's tanh-approximated GELU (gelu_new) has no BiasGelu fusion; its FFN runs unfused.",
    ),
    Family("electra", ("electra",)),
    Family(
        "mpnet",
        ("mpnet",),
        inputs=("input_ids", "attention_mask"),
        fusions={"attention": 0, "skip-layernorm": 2, "ffn": 1},
        note="MPNet adds a relative position bias inside attention, which no fused attention "
        "pattern covers; its attention runs unfused.",
    ),
    Family(
        "deberta-v2",
        ("deberta", "deberta-v2"),
        fusions={"attention": 0, "skip-layernorm": 2, "ffn": 1},
        note="DeBERTa's disentangled attention has no fused kernel in ONNX Runtime; it runs unfused.",
    ),
)

GENERIC = Family(
    "generic",
    (),
    fusions={},
    note="No family spec for this architecture: generic inputs and tolerances, no expected fusions.",
)


#: Class-name endings of a checkpoint saved as a causal language model (config "architectures").
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")


def is_decoder(config: dict[str, Any]) -> bool:
    """A causal language model's config: a decoder family tforge knows, or saved with a
    causal-LM head. Such a checkpoint builds with task text-generation, not as an encoder."""
    from pipeline.decoders.fuse import KNOWN_MODEL_TYPES

    model_type = str(config.get("model_type") or "")
    saved_as = [str(a) for a in config.get("architectures") or []]
    # An encoder family saved with a causal-LM head (BertLMHeadModel, RobertaForCausalLM) is
    # still an encoder to tforge: it builds with the encoder tasks.
    return model_type in KNOWN_MODEL_TYPES or (
        not is_encoder(model_type) and any(a.endswith(_CAUSAL_HEADS) for a in saved_as)
    )


def is_encoder(model_type: str) -> bool:
    """One of the encoder families tforge has a spec for (BERT, RoBERTa, ...)."""
    return family_of(model_type) is not GENERIC


def family_of(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return GENERIC


def _first(config: dict[str, Any], keys: tuple[str, ...], what: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    raise InputError(
        f"config.json has no {what} (looked for {', '.join(keys)})",
        "is this a Transformer checkpoint?",
    )


@dataclass(frozen=True)
class ArchitectureSpec:
    """What the pipeline needs to know about one checkpoint's architecture."""

    family: Family
    model_type: str
    layers: int
    heads: int
    hidden: int
    max_positions: int | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ArchitectureSpec:
        model_type = str(config.get("model_type") or "")
        if not model_type:
            raise InputError(
                "config.json has no model_type",
                "re-save the checkpoint with transformers' save_pretrained",
            )
        positions = next(
            (config[k] for k in _POSITION_KEYS if isinstance(config.get(k), int)), None
        )
        return cls(
            family=family_of(model_type),
            model_type=model_type,
            layers=_first(config, _LAYER_KEYS, "layer count"),
            heads=_first(config, _HEAD_KEYS, "attention head count"),
            hidden=_first(config, _HIDDEN_KEYS, "hidden size"),
            max_positions=positions,
        )

    def graph_inputs(self, tokenizer_inputs: list[str]) -> tuple[str, ...]:
        """The family's inputs that the tokenizer actually produces, in the family's order."""
        names = tuple(name for name in self.family.inputs if name in tokenizer_inputs)
        if "input_ids" not in names:
            raise InputError(
                f"the tokenizer does not produce input_ids (it gives {tokenizer_inputs})",
                "tforge builds text models; pass a checkpoint with a text tokenizer",
            )
        return names

    def summary(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "model_type": self.model_type,
            "layers": self.layers,
            "heads": self.heads,
            "hidden": self.hidden,
            "max_positions": self.max_positions,
            "note": self.family.note,
        }
