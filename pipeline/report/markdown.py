"""``report.md``: a build summary fit for a pull-request comment."""

from __future__ import annotations

from typing import Any

from pipeline.budget import FIGURES as BUDGET_FIGURES
from pipeline.report.compare import LOWER_IS_BETTER
from pipeline.report.model import Comparison, Contender, Delta, Report


def _mb(size: int | None) -> str:
    return "–" if size is None else f"{size / 1e6:.1f}"


def figure(value: float | None, spec: str) -> str:
    """A figure for a table; a dash where there is none (not measured, or not finite)."""
    return "–" if value is None else format(value, spec)


GENERATION = "text-generation"

#: (header, accuracy figure, format) of the summary's accuracy columns, per kind of task.
ENCODER_COLUMNS = (
    ("max abs err", "max_abs_error", ".2e"),
    ("mean cosine", "mean_cosine", ".6f"),
    ("agreement", "agreement", ".3f"),
)
DECODER_COLUMNS = (
    ("token match", "token_match", ".3f"),
    ("agreement", "agreement", ".3f"),
    ("max logit err", "max_abs_error", ".2e"),
    ("perplexity", "perplexity", ".3f"),
)


def accuracy_columns(report: Report) -> tuple[tuple[str, str, str], ...]:
    return DECODER_COLUMNS if report.task == GENERATION else ENCODER_COLUMNS


def reference_perplexity(report: Report) -> float | None:
    """PyTorch's perplexity on the evaluation texts (recorded with every decoder variant)."""
    return next(
        (
            c.accuracy["reference_perplexity"]
            for c in report.contenders
            if c.accuracy and c.accuracy.get("reference_perplexity") is not None
        ),
        None,
    )


def accuracy_cells(report: Report, c: Contender) -> list[str]:
    columns = accuracy_columns(report)
    if c.accuracy is None:
        cells = ["reference"] + ["–"] * (len(columns) - 1)
        if report.task == GENERATION:
            cells[-1] = figure(reference_perplexity(report), ".3f")
        return cells
    return [figure(c.accuracy.get(key), spec) for _, key, spec in columns]


def _digits(limit: float) -> str:
    """A format that shows a figure with one digit more than its limit has (at least 5)."""
    decimals = len(f"{limit}".partition(".")[2])
    return f".{max(5, decimals + 1)}f"


def _node(entry: dict[str, Any]) -> str:
    return f"`{entry.get('module') or entry['node']}`"


def _int8_section(report: Report) -> list[str]:
    """Per INT8 variant: how it was quantized, what stayed float, and the most sensitive nodes."""
    quantized = [c for c in report.contenders if c.quantization]
    if not quantized:
        return []
    int8_only = all(c.precision == "int8" for c in quantized)
    lines = ["", "## INT8" if int8_only else "## Quantization"]
    for c in quantized:
        q = c.quantization or {}
        how = str(q.get("method"))
        if q.get("weight_bits") == 7:
            how += ", 7-bit weights"
        if q.get("calibration"):
            data = q.get("calibration_data") or {}
            sign = "symmetric" if q.get("symmetric") else "asymmetric"
            how += f", {q['calibration']} calibration on {data.get('samples', '?')} samples, {sign} activations"
        if q.get("quantizer") == "nncf":
            data = q.get("calibration_data") or {}
            how += (
                f", NNCF {q.get('preset')} preset (SmoothQuant, ranges and symmetry per "
                f"activation, bias correction) calibrated on {data.get('samples', '?')} samples"
            )
        grid = q.get("grid")
        if q.get("block_size"):
            # Rounded weights are symmetric; weights kept on their own grid have zero points.
            blocks = "blocks" if grid else "symmetric blocks"
            how += f", weight-only, {blocks} of {q['block_size']}, {q.get('compute')} products"
        if grid:
            stored = ", ".join(f"{n} at {b} bits" for b, n in grid["bits"].items()) or "none"
            how += f"; weights kept on their own grid: {stored}"
            if grid["corrected"]:
                how += f" ({grid['corrected']} with a float remainder product)"
            if grid["float"]:
                how += f", {len(grid['float'])} on an 8-bit grid kept float (no fast float kernel)"
        tables = (
            f", and {q['quantized_tables']} embedding tables (weight-only)"
            if q.get("quantized_tables")
            else ""
        )
        lines += [
            "",
            f"**{c.name}** ({how}): {q.get('quantized_matmuls')} of {q.get('weight_matmuls')} "
            f"weight MatMuls in {c.precision.upper()}{tables}.",
        ]
        smooth = q.get("smooth")
        if smooth:
            lines.append(
                f"Smoothed (SmoothQuant-style, alpha {smooth['alpha']}): {smooth['inputs']} inputs "
                f"of {smooth['matmuls']} MatMuls divided per channel by scales their weight rows "
                f"take, from ranges on {smooth.get('samples', '?')} calibration samples."
            )
        outliers = q.get("outliers")
        if outliers and not outliers["matmuls"]:
            lines.append(
                f"Outlier split: no input has channels over {outliers['threshold']}x its median "
                "channel's" + (" after smoothing" if smooth else "") + "; nothing is split."
            )
        elif outliers:
            largest = ", ".join(
                f"{o['module'] or '?'} {o['ratio']}x" for o in outliers["largest"][:3]
            )
            lines.append(
                f"Outlier input channels multiplied in float beside the INT8 product: "
                f"{outliers['channels']} channels of {outliers['inputs']} inputs to "
                f"{outliers['matmuls']} MatMuls (largest "
                f"magnitude over {outliers['threshold']}x the median channel's, at most "
                f"{outliers['max_channels']} per input, measured on {outliers.get('samples', '?')} "
                f"calibration samples)" + (f"; standing out most: {largest}." if largest else ".")
            )
        budget = q.get("budget")
        if budget:
            limits = ", ".join(f"{k} {v}" for k, v in budget["limits"].items())
            verdict = "met" if budget["met"] else "NOT met (best attempt kept)"
            lines.append(
                f"Accuracy budget ({limits}): {verdict} with {budget['kept_float']} of "
                f"{budget['of']} nodes in float. Attempts:"
            )
            lines += ["", "| nodes in float | " + " | ".join(budget["limits"]) + " | meets |"]
            lines.append("|---|" + "---|" * len(budget["limits"]) + "---|")
            for attempt in sorted(budget["attempts"], key=lambda a: a["kept_float"]):
                cells = [
                    figure(attempt.get(BUDGET_FIGURES[k]), _digits(v))
                    for k, v in budget["limits"].items()
                ]
                mark = "yes" if attempt["passed"] else "no"
                lines.append(f"| {attempt['kept_float']} | " + " | ".join(cells) + f" | {mark} |")
            lines.append("")
            if budget.get("remedies"):
                tried = ", ".join(
                    f"{r['name']} " + (f"{r['kept_float']} in float" if r["met"] else "not met")
                    for r in budget["remedies"]
                )
                lines += [
                    f"Remedies searched (nodes in float to meet the budget): {tried}; "
                    f"chosen: **{budget['remedy']}**. The attempts above are the chosen search's.",
                    "",
                ]
        kept = q.get("kept_float") or []
        if kept:
            lines.append("Kept in float: " + ", ".join(_node(k) for k in kept) + ".")
        sensitive = q.get("sensitivity") or []
        if sensitive:
            by_output = any("output_error" in s for s in sensitive)
            lines += [
                "",
                "The most sensitive nodes"
                + (" (by output error with only that node in INT8)" if by_output else " (by SQNR)")
                + ":",
                "",
                "| node | module | SQNR dB | output error |",
                "|---|---|---|---|",
            ]
            for s in sensitive:
                lines.append(
                    f"| {s['node']} | {s.get('module') or '–'} | {figure(s.get('sqnr_db'), '.1f')} "
                    f"| {figure(s.get('output_error'), '.2e')} |"
                )
    return lines


def _generation_section(report: Report) -> list[str]:
    """Decoders: how the greedy continuations compare, perplexity, and decode speed."""
    variants = [c for c in report.contenders if c.kind == "variant" and c.accuracy]
    if report.task != GENERATION or not variants:
        return []
    first = variants[0].accuracy or {}
    lines = [
        "",
        "## Generation",
        "",
        f"{first.get('prompts')} evaluation prompts, {first.get('new_tokens')} new tokens each, "
        "greedy. *Token match*: generated tokens equal to PyTorch's; *agreement*: with PyTorch's "
        "tokens fed to both (teacher forcing), steps whose most likely token is PyTorch's; "
        "*logit error*: at PyTorch's most likely tokens of each step. Perplexity on the "
        f"evaluation texts: PyTorch {figure(reference_perplexity(report), '.3f')}.",
        "",
        "| variant | token match | whole continuations equal | prompts diverged (median first step) | agreement | perplexity (change) |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(c.name, c.accuracy or {}) for c in variants]
    floor = report.floor or {}
    rows += [(f"*PyTorch {precision} (floor)*", a) for precision, a in floor.items()]
    for name, a in rows:
        increase = a.get("perplexity_increase")
        change = "–" if increase is None else f"{100 * increase:+.2f}%"
        first_step = a.get("median_first_divergence")
        diverged = f"{a.get('diverged_prompts')}" + (
            f" ({first_step:.0f})" if first_step is not None else ""
        )
        lines.append(
            f"| {name} | {figure(a.get('token_match'), '.4f')} | {figure(a.get('sequence_match'), '.3f')} "
            f"| {diverged} | {figure(a.get('agreement'), '.4f')} | {figure(a.get('perplexity'), '.3f')} ({change}) |"
        )
    if floor:
        lines += [
            "",
            f"*Floor*: PyTorch itself cast to {' and '.join(floor)} (the whole model, no "
            "compiler), verified the same way: what any 16-bit deployment of this model gives "
            "up. Greedy token match is chaotic (a flipped near-tie changes the rest of a text); "
            "read a variant's figures against these.",
        ]
    decode = [s for s in report.shapes if s.startswith("decode-")]
    if decode:
        lines += [
            "",
            "Decode tokens/s (rows x steps per second at the median step; speed-up over PyTorch "
            "eager with its KV cache):",
            "",
            "| contender | " + " | ".join(decode) + " |",
            "|---|" + "---|" * len(decode),
        ]
        for c in report.contenders:
            cells = []
            for shape in decode:
                lat = c.latency.get(shape)
                cells.append(
                    "–"
                    if lat is None
                    else f"{lat.throughput:.1f}"
                    + ("" if lat.speedup is None else f" ({lat.speedup:.2f}x)")
                )
            lines.append(f"| {c.name} | " + " | ".join(cells) + " |")
    return lines


#: (header, figure, format) of the encoder floor's table.
FLOOR_COLUMNS = (
    ("max abs err", "max_abs_error", ".2e"),
    ("mean abs err", "mean_abs_error", ".2e"),
    ("mean cosine", "mean_cosine", ".7f"),
    ("worst cosine", "worst_cosine", ".7f"),
    ("agreement", "agreement", ".3f"),
)


def floor_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Encoders: PyTorch itself cast to each floor precision, against PyTorch FP32 (header,
    rows); a figure the task does not measure (cosine for a classifier) is a dash."""
    header = ["PyTorch", "device", *(name for name, _, _ in FLOOR_COLUMNS)]
    rows = [
        [precision, str(f.get("device", "cpu"))]
        + [figure(f.get(key), spec) for _, key, spec in FLOOR_COLUMNS]
        for precision, f in (report.floor or {}).items()
    ]
    return header, rows


def _floor_section(report: Report) -> list[str]:
    if report.task == GENERATION or not report.floor:
        return []
    header, rows = floor_table(report)
    devices = sorted({row[1] for row in rows})
    return [
        "",
        "## Floor",
        "",
        "PyTorch itself cast whole to each precision (no compiler), on "
        f"{' and '.join(devices)}, measured on the same batches against PyTorch FP32 as the "
        "variants are: what any deployment of this model at that precision gives up. Read an "
        "FP16 variant's error against these.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def summary_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """The headline table (header, rows): accuracy, latency per shape, size and memory."""
    header = ["contender", *(name for name, _, _ in accuracy_columns(report))]
    for shape in report.shapes:
        header += [f"{shape} p50 / p90 / p99 ms", f"{shape} speed-up"]
    header += ["size MB", "peak RSS MB"]
    gpu = any(c.device_bytes is not None for c in report.contenders)
    if gpu:
        header.append("GPU memory MB")
    rows = []
    for c in report.contenders:
        row = [f"{c.name} ({c.precision}, {c.target})", *accuracy_cells(report, c)]
        for shape in report.shapes:
            lat = c.latency.get(shape)
            if lat is None:
                row += ["–", "–"]
                continue
            row.append(f"{lat.p50_ms:.2f} / {lat.p90_ms:.2f} / {lat.p99_ms:.2f}")
            row.append("1.00x" if lat.speedup is None else f"{lat.speedup:.2f}x")
        row += [_mb(c.size_bytes), _mb(c.peak_rss_bytes)]
        if gpu:
            row.append(_mb(c.device_bytes))
        rows.append(row)
    return header, rows


def render_markdown(report: Report) -> str:
    lines = [
        f"# tforge build `{report.recipe_name}` — {'passed' if report.passed else 'FAILED'}",
        "",
    ]
    model = report.model
    described = ", ".join(f"{k} {model[k]}" for k in ("layers", "hidden", "heads") if k in model)
    params = model.get("parameters")
    lines.append(
        f"Model `{model.get('source')}` ({model.get('model_type', '?')}"
        + (f", {described}" if described else "")
        + (
            f", {params / 1e6:.1f}M parameters"
            if params and params >= 100_000
            else f", {params:,} parameters"
            if params
            else ""
        )
        + f"), task **{report.task}**."
    )
    if report.threads:
        lines.append(
            f"Latency: {report.threads} intra-op thread(s), median of interleaved runs; speed-up is PyTorch eager's p50 over the contender's."
        )
    if report.task == GENERATION and report.threads:
        lines.append(
            "`prefill-bBsS`: B prompts of S tokens through the prefill graph (time to first "
            "token); `decode-bBsS`: one decode step (one new token per row), over every step of "
            "every timed generation."
        )
    if report.memory_shape:
        lines.append(
            f"Peak RSS: a fresh process that loads the contender and runs {report.memory_shape}."
            + (
                " GPU memory: what that process holds on the device afterwards (its "
                "allocators' peak; the CUDA context not counted)."
                if any(c.device_bytes is not None for c in report.contenders)
                else ""
            )
        )
    lines.append("")
    header, rows = summary_table(report)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += _floor_section(report)
    lines += _generation_section(report)
    metrics = [c for c in report.contenders if c.task_metric is not None]
    if metrics:
        lines += [
            "",
            "Task metric (accuracy on the labelled evaluation data, worst padding side; a "
            "variant's drop is against PyTorch on the same side, the worst side's): "
            + ", ".join(f"{c.name} {c.task_metric:.4f}{_drop(c)}" for c in metrics),
        ]
    graphs = [c for c in report.contenders if c.graph]
    if graphs:
        lines += [
            "",
            "## Graph",
            "",
            "| variant | optimize | fusions | fused and normalisation ops | nodes (exported -> now) | session level |",
            "|---|---|---|---|---|---|",
        ]
        for c in graphs:
            g = c.graph or {}
            fused = ", ".join(f"{op} {n}" for op, n in (g.get("fused_ops") or {}).items())
            nodes = (
                f"{g.get('exported_nodes', '?')} -> {g.get('nodes', g.get('exported_nodes', '?'))}"
            )
            lines.append(
                f"| {c.name} | {g.get('optimize')} | {', '.join(g.get('fusions') or []) or '–'} "
                f"| {fused or '–'} | {nodes} | {g.get('session_optimization')} |"
            )
    for c in graphs:
        engine = (c.graph or {}).get("engine")
        if engine:
            p = engine.get("profile") or {}
            lines.append(
                f"\n**{c.name}**: TensorRT {engine.get('tensorrt')} engine for {engine.get('gpu')} "
                f"(compute capability {engine.get('compute_capability')}), "
                f"{_mb(engine.get('engine_bytes'))} MB, built in {engine.get('build_seconds')} s; "
                f"profile [batch, sequence] min {p.get('min')}, opt {p.get('opt')}, max {p.get('max')}."
            )
        onnx = (c.graph or {}).get("onnx_accuracy")
        if onnx:
            lines.append(
                f"Its ONNX graph on ONNX Runtime CPU: max abs err {figure(onnx.get('max_abs_error'), '.2e')}, "
                f"mean cosine {figure(onnx.get('mean_cosine'), '.6f')}, agreement {figure(onnx.get('agreement'), '.3f')}."
            )
    lines += _int8_section(report)
    if report.comparison is not None:
        lines += ["", render_comparison(report.comparison, level=2).rstrip()]
    lines += ["", "## Checks", ""]
    if not report.checks:
        lines.append("No checks.")
    for check in report.checks:
        mark = "✅" if check.passed else "❌"
        lines.append(f"- {mark} {check.source}: {check}")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    lines += ["", "## Stages", "", "| step | this build | seconds |", "|---|---|---|"]
    for stage in report.stages:
        done = "from cache" if stage.cached else "ran"
        seconds = f"({stage.seconds:.2f} when built)" if stage.cached else f"{stage.seconds:.2f}"
        lines.append(f"| {stage.step} | {done} | {seconds} |")
    hw = report.environment.get("hardware", {})
    versions = report.environment.get("versions", {})
    gpu = report.gpu_label()
    lines += [
        "",
        f"<sub>run {report.run_id} · tforge {report.tforge_version} · {hw.get('cpu', '?')} ({hw.get('physical_cores', '?')} cores) · "
        + (f"{gpu} · " if gpu else "")
        + " · ".join(
            f"{k} {versions[k]}"
            for k in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")
            if k in versions
        )
        + "</sub>",
        "",
    ]
    return "\n".join(lines)


def _drop(contender: Contender) -> str:
    drop = (contender.accuracy or {}).get("task_metric_drop")
    return "" if drop is None else f" (drop {drop:+.4f})"


def _figure_spec(d: Delta) -> str:
    """The format of a compared figure: milliseconds, speed-ups and MB; a count; a check's
    figure (``tolerance:max_abs_error``), of any magnitude; an accuracy figure."""
    if d.shape is not None or d.metric == "size_mb":
        return ".2f"
    if d.metric == "nonfinite_outputs":
        return ".0f"
    return ".4g" if ":" in d.metric else ".6f"


def _change(d: Delta) -> str:
    if d.change is None:
        return "–"
    if d.shape is not None or d.metric == "size_mb":
        return f"{d.change:+.1%}"
    if d.metric == "nonfinite_outputs":
        return f"{d.change:+.0f}"
    return f"{d.change:+.5f}"


def _limit(d: Delta) -> str:
    if d.limit is None:
        return "–"
    if d.shape is not None or d.metric == "size_mb":
        return f"<= {d.limit:+.1%}" + (f" (noise +-{d.noise:.1%})" if d.noise is not None else "")
    if d.metric == "nonfinite_outputs":
        return "no rise"
    # A lower-is-better figure (the perplexity increase) has an upper bound.
    return f"<= {d.limit:+.5f}" if d.metric in LOWER_IS_BETTER else f">= {d.limit:+.5f}"


_MARK = {
    "ok": "ok",
    "improved": "improved",
    "noise": "noise",
    "regression": "❌ regression",
    "missing": "❌ missing",
    "new": "new",
}


def sorted_deltas(comparison: Comparison) -> list[Delta]:
    """Regressions first, then improvements, noise, new figures, and the unchanged."""
    order = {"regression": 0, "missing": 0, "improved": 1, "noise": 2, "new": 3, "ok": 4}
    return sorted(comparison.deltas, key=lambda d: order[d.status])


def comparison_table(
    comparison: Comparison, marks: bool = True
) -> tuple[list[str], list[list[str]]]:
    """Every compared figure (header, rows) in :func:`sorted_deltas` order; ``marks``: a cross
    before each regression (for Markdown; HTML colours the row instead)."""
    header = ["variant", "figure", "baseline", "candidate", "change", "allowed", "verdict"]
    rows = []
    for d in sorted_deltas(comparison):
        label = d.metric + (f" @{d.shape}" if d.shape else "")
        spec = _figure_spec(d)
        verdict = _MARK[d.status] if marks else d.status
        verdict += f" ({d.note})" if d.note else ""
        rows.append(
            [
                d.variant,
                label,
                figure(d.baseline, spec),
                figure(d.candidate, spec),
                _change(d),
                _limit(d),
                verdict,
            ]
        )
    return header, rows


def render_comparison(comparison: Comparison, level: int = 1) -> str:
    """Markdown: the verdict, warnings, regressions first, then every other figure."""
    regressions = comparison.regressions
    verdict = (
        "no regression"
        if comparison.passed
        else f"{len(regressions)} regression{'s' if len(regressions) != 1 else ''}"
    )
    h = "#" * level
    lines = [
        f"{h} `{comparison.candidate_run}` against baseline `{comparison.baseline_run}`: {verdict}",
        "",
    ]
    t = comparison.thresholds
    decoders = any(d.metric in ("token_match", "perplexity_increase") for d in comparison.deltas)
    accuracy = (
        f"token match drop <= {t.get('max_token_match_drop')}, agreement drop <= "
        f"{t['max_agreement_drop']}, perplexity increase growth <= {t.get('max_perplexity_increase')}"
        if decoders
        else f"mean cosine drop <= {t['max_cosine_drop']}, worst cosine drop <= "
        f"{t['max_worst_cosine_drop']}, agreement drop <= {t['max_agreement_drop']}, task metric "
        f"drop <= {t['max_task_metric_drop']}"
    )
    lines.append(
        f"Thresholds: {accuracy}, latency ({t['latency_basis']}) "
        f"+{t['max_latency_regression'] * 100:g}% beyond a {t['noise_sigmas']:g}-sigma noise band, "
        f"size +{t['max_size_growth'] * 100:g}%."
        + (
            f" Latency regressions re-measured {comparison.remeasured} time(s)."
            if comparison.remeasured
            else ""
        )
    )
    if comparison.warnings:
        lines += [""] + [f"- ⚠️ {w}" for w in comparison.warnings]
    header, rows = comparison_table(comparison)
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    return "\n".join(lines)
