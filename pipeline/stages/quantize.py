"""Stage ``quantize``: INT8 weights per channel; activations at run time or from calibration.

* ``dynamic``: ONNX Runtime's dynamic quantizer (MatMul with a constant weight ->
  DynamicQuantizeLinear + MatMulInteger): each batch's activation range is measured as it runs.
* ``static``: QDQ (QuantizeLinear/DequantizeLinear pairs around each quantized MatMul) with the
  activation ranges of a calibration table (the ``calibrate`` stage), through ONNX Runtime's
  QDQ quantizer. QDQ is the form TensorRT and OpenVINO take; ONNX Runtime's CPU provider fuses
  each pair chain into an integer kernel when the session optimises at "extended" or "all".

The attention core (MultiHeadAttention, or its MatMuls in a standard-op graph) stays in float
either way. The quantizer's call
succeeds even when it quantized nothing (a graph without value types gets no quantized MatMul
at all), so the stage counts what was quantized and fails on a shortfall.

Input: a model folder (exported or optimized), and for ``static`` the calibration folder;
output: ``model/`` in the same layout.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.artifacts import Artifact
from pipeline.budget import FIGURES, BudgetResult, search, shortfall
from pipeline.calibration.table import CalibrationTable
from pipeline.environment import int8_products_saturate
from pipeline.errors import PreconditionError, first_line
from pipeline.outliers import SMOOTH_ALPHA
from pipeline.sensitivity import (
    matmul_sensitivity,
    module_name,
    output_error,
    rank_by_output_error,
)
from pipeline.stages.base import BuildContext, Stage, StageConfig, StageResult
from pipeline.stages.export import (
    _TWO_GB,
    MODEL_FILE,
    graph_stats,
    load_onnx,
    require_model_file,
    save_onnx,
    uses_external_data,
)
from pipeline.stages.load import TOKENIZER_FILES
from pipeline.stages.reference import ReferenceData
from pipeline.stages.verify import compare_to_reference

log = logging.getLogger(__name__)

#: Ops the dynamic quantizer leaves behind for a quantized MatMul.
QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


class QuantizeConfig(StageConfig):
    method: Literal["dynamic", "static"] = "dynamic"
    #: One scale per output channel of each weight (per-tensor loses ~0.03 cosine on MiniLM).
    per_channel: bool = True
    #: 7-bit weights; by default where this CPU's INT8 products saturate (x86 without VNNI:
    #: pipeline.environment.int8_products_saturate).
    reduce_range: bool = Field(default_factory=int8_products_saturate)
    #: Node names kept in float.
    exclude: tuple[str, ...] = ()
    #: Accuracy limits (pipeline.budget.FIGURES keys); None: quantize every weight MatMul.
    budget: dict[str, float] | None = None
    #: How the budget search runs candidates (as the variant will run): the session level,
    #: threads and the CPU target (ort-openvino computes Q/DQ on integer kernels and the float
    #: nodes in bf16 where the CPU has it, so its candidates are measured there).
    session_optimization: str = "all"
    threads: int = 1
    target: str = "ort-cpu"
    #: ort-openvino with static_shapes: the (batch, sequence) shapes candidates are compiled for.
    shapes: tuple[tuple[int, int], ...] = ()
    #: Evaluation batches the per-node sensitivity is measured on.
    sensitivity_batches: int = 8
    #: Remedies the budget search tries beside these settings (pipeline.recipe.REMEDIES).
    remedies: tuple[str, ...] = ()
    #: Dynamic: (threshold, max_channels) of the input channels multiplied in float beside the
    #: INT8 product (pipeline.outliers), from the ``channels`` stage's ranges; None: none.
    outliers: tuple[float, int] | None = None
    #: Dynamic: SmoothQuant-style alpha; every weight MatMul input not split is divided by
    #: per-channel scales its weight rows take (pipeline.outliers); None: no smoothing.
    smooth: float | None = None
    #: Static: whose quantizer makes the Q/DQ graph. onnxruntime: ONNX Runtime's, with the
    #: ranges of the calibrate stage's table; nncf: NNCF's transformer preset
    #: (pipeline.nncf_int8), which calibrates itself on the texts ``draw`` describes.
    quantizer: Literal["onnxruntime", "nncf"] = "onnxruntime"
    #: nncf: the calibration draw (samples, seed, batch_size, max_length, text_field).
    draw: dict[str, Any] | None = None


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Keep ONNX Runtime's quantization tools from writing to the build's log and stdout.

    They log through the root logger (per-tensor INFO lines, and advice to run their
    pre-processing, which infer-shapes already does) or their module's (the weight-only
    quantizer: a line per node) and print histogram settings; what the stage needs from them
    it counts and records itself.
    """

    def keep(record: logging.LogRecord) -> bool:
        if record.name == "root":
            return record.levelno >= logging.ERROR
        if record.name.startswith("onnxruntime.quantization"):
            return record.levelno >= logging.WARNING
        return True

    root = logging.getLogger()
    handlers = list(root.handlers)
    for handler in handlers:
        handler.addFilter(keep)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(keep)


def quantized_matmuls(model: Any) -> tuple[int, set[str]]:
    """How many MatMuls are quantized, and which weight MatMuls are still float.

    Dynamic: the integer ops the quantizer leaves. Static (QDQ): MatMuls whose weight comes
    through a DequantizeLinear.
    """
    ops = Counter(node.op_type for node in model.graph.node)
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    qdq = sum(
        1
        for n in model.graph.node
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in dequantized
    )
    return sum(ops[op] for op in QUANTIZED_OPS) + qdq, set(weight_matmuls(model))


def weight_matmuls(model: Any) -> list[str]:
    """MatMul nodes whose second input is an initializer: what dynamic INT8 can quantize."""
    constants = {init.name for init in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in constants
    ]


def quantize_file(
    source: Path,
    target: Path,
    config: QuantizeConfig,
    exclude: Sequence[str],
    table: CalibrationTable | None = None,
) -> dict[str, Any]:
    """Quantize ``source`` into ``target`` (both model.onnx paths); returns what was quantized.

    Fails when the quantizer itself fails or leaves weight MatMuls outside ``exclude`` in float.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_model = onnx.load(str(source), load_external_data=False)
    candidates = weight_matmuls(float_model)
    external = sum(
        init.ByteSize() for init in float_model.graph.initializer
    ) > _TWO_GB or uses_external_data(float_model)
    # MatMul only: INT8 variants fuse attention as MultiHeadAttention, so the Q/K/V
    # projections are MatMuls here. A packed Attention would become QAttention, which loses
    # far more (mean cosine 0.84, agreement 0.48). Quantizing every op type wrecks accuracy.
    common: dict[str, Any] = {
        "per_channel": config.per_channel,
        "reduce_range": config.reduce_range,
        "weight_type": QuantType.QInt8,
        "op_types_to_quantize": ["MatMul"],
        "nodes_to_exclude": list(exclude),
        "use_external_data_format": external,
    }
    expected = [name for name in candidates if name not in set(exclude)]
    try:
        with quiet_quantizer():
            if config.method == "dynamic":
                quantize_dynamic(source, target, extra_options={"MatMulConstBOnly": True}, **common)
            elif not expected:
                # Every weight MatMul is kept in float: the model is the float graph (an empty
                # node list would tell the QDQ quantizer to quantize every node).
                onnx.save(
                    onnx.load(str(source)),
                    str(target),
                    save_as_external_data=external,
                    location=target.name + ".data",
                )
            else:
                if table is None:
                    raise ValueError("static quantization needs a calibration table")
                # The weight MatMuls by name: the QDQ quantizer ignores MatMulConstBOnly and
                # would also quantize the attention products of a standard-op graph (QK^T and
                # softmax(.)V, activations on both sides), which are not weight MatMuls: not
                # counted, not ranked, never kept float by the budget.
                _quantize_static(source, target, table, {**common, "nodes_to_quantize": expected})
    # The quantizer fails in library terms (e.g. "Unable to find data type for
    # weight_name" on a graph without value types): said in one line, with the fix.
    except Exception as error:
        log.debug("quantization failed", exc_info=True)
        raise PreconditionError(
            f"ONNX Runtime's quantizer failed: {type(error).__name__}: {first_line(error)}",
            "quantize an optimized graph (optimize: ort or standard), which carries value types",
        ) from error
    quantized, still_float = quantized_matmuls(onnx.load(str(target), load_external_data=False))
    missed = sorted(set(expected) & still_float)
    if quantized < len(expected) or missed:
        raise PreconditionError(
            f"only {quantized} of {len(expected)} weight MatMuls were quantized; still float: {missed[:5]}",
            "the graph probably lacks value types; quantize an optimized graph (optimize: ort or standard)",
        )
    return {"weight_matmuls": len(candidates), "quantized_matmuls": quantized}


def _quantize_static(
    source: Path, target: Path, table: CalibrationTable, common: dict[str, Any]
) -> None:
    """QDQ with the table's ranges: ONNX Runtime reads them as a calibration cache file."""
    import inspect

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise PreconditionError(
            "static INT8 from a stored calibration table needs a newer onnxruntime "
            "(quantize_static with calibration_cache_path)",
            "pip install -U onnxruntime",
        )
    data = table.tensors_data()
    with tempfile.TemporaryDirectory(prefix="ranges-", dir=target.parent) as work:
        cache = Path(work) / "ranges.json"
        save_tensors_data(data, cache)
        quantize_static(
            source,
            target,
            None,
            quant_format=QuantFormat.QDQ,
            # Signed activations with symmetric ranges (TensorRT's form); unsigned with the
            # range's own zero point otherwise (ONNX Runtime CPU's U8S8 kernels).
            activation_type=QuantType.QInt8 if table.symmetric else QuantType.QUInt8,
            calibrate_method=data.calibration_method,
            calibration_cache_path=cache,
            extra_options={
                "ActivationSymmetric": table.symmetric,
                "WeightSymmetric": True,
                "MatMulConstBOnly": True,
            },
            **common,
        )


class QuantizeStage(Stage[QuantizeConfig]):
    name = "quantize"
    # 2: per-node sensitivity, the accuracy budget, static QDQ (remedies: keyed);
    # 3: static QDQ on weight MatMuls only (the attention products stay float)
    version = 3

    def requires(self, inputs: Mapping[str, Artifact]) -> None:
        require_model_file("quantize", inputs["model"].path)
        if self.config.quantizer == "nncf" and not {"calibration", "info"} <= set(inputs):
            raise PreconditionError(
                "NNCF quantization has no calibration data", "this is a bug in the pipeline"
            )
        if self.config.method == "static" and "calibration" not in inputs:
            raise PreconditionError(
                "static quantization has no calibration table", "this is a bug in the pipeline"
            )
        ranged = self.config.outliers or self.config.smooth or "smooth" in self.config.remedies
        if ranged and "channels" not in inputs:
            raise PreconditionError(
                "quantize.outliers/smooth has no channel ranges", "this is a bug in the pipeline"
            )

    def key_config(self) -> dict[str, Any]:
        config = super().key_config()
        # Builds without remedies, outliers or smoothing, on ort-cpu, keep their keys.
        for name in ("remedies", "outliers", "smooth", "draw", "shapes"):
            if not config[name]:
                del config[name]
        for name, default in (("target", "ort-cpu"), ("quantizer", "onnxruntime")):
            if config[name] == default:
                del config[name]
        return config

    def describe(self) -> str:
        budget = " within an accuracy budget" if self.config.budget else ""
        outliers = ", outlier channels in float" if self.config.outliers else ""
        smooth = ", smoothed inputs" if self.config.smooth else ""
        nncf = " (NNCF)" if self.config.quantizer == "nncf" else ""
        return f"quantize int8 {self.config.method}{nncf}{smooth}{outliers}{budget}"

    def run(self, ctx: BuildContext, inputs: Mapping[str, Artifact], out: Path) -> StageResult:
        import onnx

        from pipeline.stages.calibrate import TABLE

        cfg = self.config
        source = inputs["model"].path
        float_model = onnx.load(str(source / MODEL_FILE), load_external_data=False)
        modules = {n.name: module_name(n) for n in float_model.graph.node}
        unknown = sorted(set(cfg.exclude) - set(modules))
        if unknown:
            raise PreconditionError(
                f"quantize.exclude names nodes the graph does not have: {unknown[:5]}",
                "take node names from `tforge inspect` of the variant's float model",
            )
        if cfg.quantizer == "nncf":
            return self._quantize_nncf(ctx, inputs, out, modules)
        table = None
        if cfg.method == "static":
            table = CalibrationTable.read(inputs["calibration"].path / TABLE)
        with tempfile.TemporaryDirectory(prefix="split-", dir=out) as work:
            base = Rewrite(source, [], {})
            if cfg.outliers or cfg.smooth:
                # Every quantization below starts from the rewritten float graph.
                base = self._rewrite(inputs, source, Path(work) / "configured", modules, cfg)
            # The budget's smooth remedy: the same searches on the smoothed graph.
            smoothed = None
            if cfg.budget and "smooth" in cfg.remedies and cfg.smooth is None:
                remedy = cfg.model_copy(update={"smooth": SMOOTH_ALPHA})
                smoothed = self._rewrite(inputs, source, Path(work) / "smooth", modules, remedy)
            return self._quantize(ctx, inputs, base, smoothed, out, modules, table)

    def _rewrite(
        self,
        inputs: Mapping[str, Artifact],
        source: Path,
        work: Path,
        modules: Mapping[str, str | None],
        cfg: QuantizeConfig,
    ) -> Rewrite:
        """The float graph with its inputs smoothed and/or its outlier input channels split out
        (pipeline.outliers), in ``work``; returns its folder, the float MatMuls added and the
        stats of what was done ({"smooth": ..., "outliers": ...})."""
        import onnx

        from pipeline.outliers import (
            OutlierSettings,
            plan_channels,
            ranges_from_json,
            smooth_inputs,
            split_channels,
            split_outliers,
            standout,
        )
        from pipeline.stages.channels import RANGES

        work.mkdir()
        ranges = ranges_from_json((inputs["channels"].path / RANGES).read_text(encoding="utf-8"))
        model = onnx.load(str(source / MODEL_FILE))
        consumers = {
            n.input[1]: n.name
            for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1
        }
        # Nodes kept in float need neither (it would only add work).
        excluded = {n.input[1] for n in model.graph.node if n.name in cfg.exclude}
        settings = OutlierSettings(*cfg.outliers) if cfg.outliers else None
        chosen, scales = plan_channels(model, ranges, settings, cfg.smooth, excluded)
        inputs_split, channels_split = split_channels(model, chosen)
        stats: dict[str, Any] = {}
        if cfg.smooth is not None:
            smoothed_inputs, smoothed_matmuls = smooth_inputs(model, scales)
            stats["smooth"] = {
                "alpha": cfg.smooth,
                "inputs": smoothed_inputs,
                "matmuls": smoothed_matmuls,
            }
        added = split_outliers(model, chosen) if settings is not None else []
        onnx.save(
            model,
            str(work / MODEL_FILE),
            save_as_external_data=model.ByteSize() > _TWO_GB,
            location=MODEL_FILE + ".data",
        )
        if settings is None:
            return Rewrite(work, added, stats)
        threshold, most = settings.threshold, settings.max_channels
        if not chosen and cfg.smooth is None:
            largest = max((standout(r) for r in ranges.values()), default=0.0)
            log.warning(
                "quantize.outliers: no input channel is over %sx its input's median channel "
                "(the largest is %.1fx); nothing is split, the variant is plain dynamic INT8",
                threshold,
                largest,
            )
        stats["outliers"] = {
            "threshold": threshold,
            "max_channels": most,
            "matmuls": len(added),
            # Distinct activations split and distinct channels of theirs (Q/K/V count once).
            "inputs": inputs_split,
            "channels": channels_split,
            # The inputs that stand out most: (module, channels, largest x the median).
            "largest": [
                {
                    "module": modules.get(consumers.get(weight, "")),
                    "channels": len(chosen[weight]),
                    "ratio": round(standout(ranges[weight]), 1),
                }
                for weight in sorted(chosen, key=lambda w: -standout(ranges[w]))[:SHOWN]
            ],
        }
        return Rewrite(work, added, stats)

    def _quantize(
        self,
        ctx: BuildContext,
        inputs: Mapping[str, Artifact],
        base: Rewrite,
        smoothed: Rewrite | None,
        out: Path,
        modules: Mapping[str, str | None],
        table: CalibrationTable | None,
    ) -> StageResult:
        cfg = self.config
        source, floats = base.source, base.floats
        ref = ReferenceData.of(inputs["reference"])
        feeds = [
            b.feed for b in itertools.islice(ref.batches(ref.sides[0]), cfg.sensitivity_batches)
        ]

        def sqnr_ranking(graph: Path) -> list[Any]:
            with ctx.progress.task("INT8 sensitivity per node", 1) as advance:
                measured = matmul_sensitivity(
                    graph / MODEL_FILE,
                    feeds,
                    per_channel=cfg.per_channel,
                    reduce_range=cfg.reduce_range,
                    table=table,
                    threads=cfg.threads,
                )
                advance(1)
            return measured

        ranking = sqnr_ranking(source)
        candidates = [s.node for s in ranking if s.node not in cfg.exclude and s.node not in floats]
        kept: list[str] = []
        budget: dict[str, Any] | None = None
        target = out / "model"
        target.mkdir()
        path = target / MODEL_FILE
        output_errors: dict[str, float] = {}
        chosen = cfg
        if cfg.budget:

            def make(exclude: list[str], settings: QuantizeConfig, path: Path) -> None:
                graph = smoothed if smoothed is not None and settings.smooth != cfg.smooth else base
                # The outlier products (``floats``) stay float in every candidate.
                quantize_file(
                    graph.source / MODEL_FILE, path, settings, [*graph.floats, *exclude], table
                )

            with tempfile.TemporaryDirectory(prefix="budget-", dir=out) as work:
                trials, rankings = self._search(ctx, make, Path(work), candidates, ref, modules)
            name, settings, order, result = choose_remedy(cfg.budget, trials)
            # The output errors of the graph the model is made from.
            output_errors = dict(rankings.get(name, rankings[""]))
            chosen = cfg.model_copy(update=settings)
            if name == "smooth" and smoothed is not None:
                # The model is made from the smoothed graph: its SQNR is what the report lists.
                base = smoothed
                ranking = sqnr_ranking(base.source)
            kept = order[: result.kept_float]
            budget = _budget_record(cfg.budget, result, len(candidates))
            if len(trials) > 1:
                budget["remedy"] = name
                budget["remedies"] = [
                    {
                        "name": trial_name,
                        "met": trial.met,
                        "kept_float": trial.kept_float,
                        "attempts": [a.as_dict() for a in trial.attempts],
                    }
                    for trial_name, _, _, trial in trials
                ]
        with ctx.progress.task(f"quantize (int8, {cfg.method})", 1) as advance:
            counts = quantize_file(
                base.source / MODEL_FILE, path, chosen, [*cfg.exclude, *base.floats, *kept], table
            )
            # The outlier products are the model's MatMuls' parts, not MatMuls of their own.
            counts["weight_matmuls"] -= len(base.floats)
            advance(1)
        _copy_model_files(inputs["model"].path, target)
        stats = {
            "method": cfg.method,
            "weight_bits": 7 if chosen.reduce_range else 8,
            **counts,
            **_described_nodes(
                modules,
                {s.node: s.sqnr_db for s in ranking},
                output_errors,
                [*cfg.exclude, *kept],
                [s.node for s in ranking if s.node not in floats],
            ),
            **({"budget": budget} if budget is not None else {}),
            **base.stats,
            **({"calibration": table.method, "symmetric": table.symmetric} if table else {}),
            **graph_stats(path),
        }
        return StageResult(outputs={"model": "model"}, stats=stats)

    def _quantize_nncf(
        self,
        ctx: BuildContext,
        inputs: Mapping[str, Artifact],
        out: Path,
        modules: Mapping[str, str | None],
    ) -> StageResult:
        """NNCF's INT8 (pipeline.nncf_int8): one NNCF run, calibrated on the drawn texts; the
        budget's candidates keep nodes float in that one fake-quantized graph, and the model
        is the chosen one with its weights stored as INT8."""
        import onnx

        from pipeline import nncf_int8
        from pipeline.stages.calibrate import CalibrateConfig, calibration_feeds

        cfg = self.config
        assert cfg.draw is not None
        float_model = load_onnx(inputs["model"].path / MODEL_FILE)
        matmuls = [n for n in weight_matmuls(float_model) if n not in cfg.exclude]
        draw = CalibrateConfig(method="minmax", symmetric=True, **cfg.draw)
        samples, batches, max_length = calibration_feeds(inputs, draw)
        with ctx.progress.task("quantize (int8, NNCF)", 1) as advance:
            fake = nncf_int8.quantize(float_model, batches.feeds, cfg.exclude)
            advance(1)
        del float_model
        # The weight MatMuls, then the embedding tables NNCF stored weight-only.
        tables = [n for n in nncf_int8.quantized_nodes(fake) if n not in set(matmuls)]
        candidates = [*matmuls, *tables]
        ref = ReferenceData.of(inputs["reference"])

        def make(exclude: list[str], settings: QuantizeConfig, path: Path) -> None:
            floats = [n for n in exclude if n not in cfg.exclude]  # NNCF ignored the rest
            save_onnx(nncf_int8.keep_float(fake, floats), path)

        kept: list[str] = []
        budget: dict[str, Any] | None = None
        output_errors: dict[str, float] = {}
        if cfg.budget:
            with tempfile.TemporaryDirectory(prefix="budget-", dir=out) as work:
                trials, rankings = self._search(ctx, make, Path(work), candidates, ref, modules)
            _, _, order, result = trials[0]
            output_errors = dict(rankings[""])
            kept = order[: result.kept_float]
            budget = _budget_record(cfg.budget, result, len(candidates))
        target = out / "model"
        target.mkdir()
        path = target / MODEL_FILE
        save_onnx(nncf_int8.fold_weights(nncf_int8.keep_float(fake, kept)), path)
        quantized, _ = quantized_matmuls(onnx.load(str(path), load_external_data=False))
        expected = len([n for n in matmuls if n not in kept])
        if quantized < expected:
            raise PreconditionError(
                f"NNCF quantized {quantized} of {expected} weight MatMuls",
                "check the graph's ops with tforge inspect (NNCF skips ops it does not know)",
            )
        _copy_model_files(inputs["model"].path, target)
        stats = {
            "method": cfg.method,
            "quantizer": "nncf",
            "preset": nncf_int8.PRESET,
            "weight_matmuls": len(matmuls) + len(cfg.exclude),
            "quantized_matmuls": quantized,
            # Embedding tables stored in INT8 (weight-only: the Gather reads them dequantized).
            "quantized_tables": len([n for n in tables if n not in kept]),
            **_described_nodes(modules, {}, output_errors, [*cfg.exclude, *kept], []),
            **({"budget": budget} if budget is not None else {}),
            "calibration_data": {
                "samples": len(samples),
                "tokens": batches.tokens,
                "truncated": batches.truncated,
                "max_length": max_length,
            },
            **graph_stats(path),
        }
        return StageResult(outputs={"model": "model"}, stats=stats)

    def _search(
        self,
        ctx: BuildContext,
        make: Callable[[list[str], QuantizeConfig, Path], None],
        work: Path,
        candidates: list[str],
        ref: ReferenceData,
        modules: Mapping[str, str | None],
    ) -> tuple[list[Trial], dict[str, list[tuple[str, float]]]]:
        """Rank nodes by output error alone, then keep 0, 1, 2, 4... of the worst in float:
        with the variant's own settings, then with each remedy the recipe asks for.

        The ranking is measured once, with the variant's settings, and reused by every remedy
        but ``smooth`` (a different graph, whose errors sit elsewhere): re-measuring it per remedy
        would cost one quantization per node each time.
        """
        from pipeline.backends.runners import runner_for

        cfg = self.config
        assert cfg.budget is not None
        output = ref.index["output"]
        missing = [key for key in cfg.budget if FIGURES[key] not in _task_figures(ref)]
        if missing:
            raise PreconditionError(
                f"quantize.budget sets {missing}, which a {ref.index['task']} model does not measure",
                "use min_agreement (and the cosine limits only for feature-extraction)",
            )

        def quantized(exclude: list[str], label: str, settings: QuantizeConfig = cfg) -> Any:
            folder = work / label
            folder.mkdir()
            make(exclude, settings, folder / MODEL_FILE)
            return runner_for(
                cfg.target,
                folder,
                cfg.threads,
                cfg.session_optimization,
                label,
                "int8",
                cfg.shapes,
            )

        batches = [
            (b.feed, b.output, b.mask)
            for b in itertools.islice(ref.batches(ref.sides[0]), cfg.sensitivity_batches)
        ]

        def rank(settings: QuantizeConfig, label: str) -> list[tuple[str, float]]:
            def error_with_only(node: str) -> float:
                others = [n for n in candidates if n != node]
                runner = quantized(
                    [*cfg.exclude, *others], f"only-{candidates.index(node)}", settings
                )
                error = output_error(lambda feed: runner.run(feed)[output], batches)
                shutil.rmtree(runner.path.parent)
                return error

            with ctx.progress.task(f"INT8 output error per node{label}", len(candidates)) as step:

                def measured(node: str) -> float:
                    error = error_with_only(node)
                    step(1)
                    return error

                return rank_by_output_error(candidates, measured)

        # "" -> the variant's own graph; "smooth" -> the smoothed one's.
        rankings = {"": rank(cfg, "")}
        ranked = [node for node, _ in rankings[""]]
        trials: list[Trial] = []
        for name, settings, order in remedy_trials(cfg, ranked, modules):
            variant = cfg.model_copy(update=settings)
            if name == "smooth":
                # Smoothing moves the error between nodes: ranked again on the smoothed graph.
                rankings[name] = rank(variant, " (smoothed)")
                order = [node for node, _ in rankings[name]]

            def evaluate(
                k: int,
                variant: QuantizeConfig = variant,
                order: list[str] = order,
                name: str = name,
            ) -> dict[str, Any]:
                runner = quantized([*cfg.exclude, *order[:k]], f"{name}-k{k}", variant)
                figures = compare_to_reference(ref, lambda feed: runner.run(feed)[output])
                shutil.rmtree(runner.path.parent)
                return figures

            steps = 2 * max(1, math.ceil(math.log2(len(order) + 1))) + 1
            with ctx.progress.task(f"accuracy budget search ({name})", steps) as advance:
                result = search(order, cfg.budget, evaluate, on_attempt=lambda _: advance(1))
            for made in result.attempts:
                log.info(
                    "budget (%s): %d node(s) in float -> %s (%s)",
                    name,
                    made.kept_float,
                    ", ".join(
                        f"{k} {v:.5f}" if v is not None else f"{k} -"
                        for k, v in made.figures.items()
                    ),
                    "meets" if made.passed else "misses",
                )
            trials.append((name, settings, order, result))
        return trials, rankings


#: How many of the most sensitive nodes the stage records.
SHOWN = 10


@dataclass(frozen=True)
class Rewrite:
    """The float graph every quantization of the stage starts from: its folder, the float
    MatMuls the outlier split added (never quantized) and what was done (stats)."""

    source: Path
    floats: list[str]
    stats: dict[str, Any]


#: One budget search: remedy name, the settings it changes, node order, result.
Trial = tuple[str, dict[str, Any], list[str], BudgetResult]


def is_ffn_down(module: str | None) -> bool:
    """A BERT-style FFN down-projection (``encoder.layer.N.output.dense``; not attention's)."""
    return (
        bool(module) and str(module).endswith("output.dense") and ".attention." not in str(module)
    )


def remedy_trials(
    cfg: QuantizeConfig, ranked: list[str], modules: Mapping[str, str | None]
) -> list[tuple[str, dict[str, Any], list[str]]]:
    """The searches to run: the variant's own settings first, then each remedy asked for."""
    trials: list[tuple[str, dict[str, Any], list[str]]] = [("as configured", {}, ranked)]
    for remedy in cfg.remedies:
        if remedy == "reduce_range" and not cfg.reduce_range:
            trials.append((remedy, {"reduce_range": True}, ranked))
        elif remedy == "per_tensor" and cfg.per_channel:
            trials.append((remedy, {"per_channel": False}, ranked))
        elif remedy == "smooth" and cfg.smooth is None:
            trials.append((remedy, {"smooth": SMOOTH_ALPHA}, ranked))
        elif remedy == "ffn_down_first":
            down = [n for n in ranked if is_ffn_down(modules.get(n))]
            if down:
                trials.append((remedy, {}, down + [n for n in ranked if n not in down]))
    return trials


def choose_remedy(limits: Mapping[str, float], trials: list[Trial]) -> Trial:
    """The data's choice: of the searches that met the budget, the one with the fewest nodes
    in float (the fastest INT8 model), ties to the earlier (the variant's own settings first);
    when none met it, the one that came closest."""
    met = [t for t in trials if t[3].met]
    if met:
        return min(met, key=lambda t: t[3].kept_float)

    def best_shortfall(t: Trial) -> float:
        attempt = next(a for a in t[3].attempts if a.kept_float == t[3].kept_float)
        return shortfall(limits, attempt.figures)

    return min(trials, key=best_shortfall)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _task_figures(ref: ReferenceData) -> set[str]:
    """The figures verify measures for the reference's task."""
    if ref.index["task"] == "feature-extraction":
        return {"mean_cosine", "worst_cosine", "agreement"}
    return {"agreement"}


def _copy_model_files(source: Path, target: Path) -> None:
    """The checkpoint's config and tokenizer beside the quantized graph."""
    for name in ("config.json", *TOKENIZER_FILES):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _described_nodes(
    modules: Mapping[str, str | None],
    sqnr: Mapping[str, float],
    output_errors: Mapping[str, float],
    kept: Sequence[str],
    by_sqnr: Sequence[str],
) -> dict[str, list[dict[str, Any]]]:
    """The stats' ``kept_float`` and ``sensitivity`` lists: the most sensitive nodes by output
    error when it was measured, else by SQNR."""

    def described(node: str) -> dict[str, Any]:
        entry = {"node": node, "module": modules.get(node), "sqnr_db": _rounded(sqnr.get(node))}
        if node in output_errors:
            entry["output_error"] = float(f"{output_errors[node]:.4g}")
        return entry

    worst = sorted(output_errors, key=lambda n: -output_errors[n]) if output_errors else by_sqnr
    return {
        "kept_float": [described(n) for n in kept],
        "sensitivity": [described(n) for n in worst[:SHOWN]],
    }


def _budget_record(limits: dict[str, float], result: BudgetResult, of: int) -> dict[str, Any]:
    """The stats' ``budget``: the limits, whether they were met, and every attempt."""
    return {
        "limits": limits,
        "met": result.met,
        "kept_float": result.kept_float,
        "of": of,
        "attempts": [a.as_dict() for a in result.attempts],
    }
