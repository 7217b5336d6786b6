"""``report.html``: one self-contained page with the build's tables and plots.

No network and no external assets: the plots are matplotlib SVG written inline (text kept as
text, so the page's font draws it), the style sheet is inline, and the only script is a
twenty-line check, run by the browser, that marks how many plots were laid out with a visible
size (``<body data-plots-rendered="N">``) — what the headless-browser test reads.

Plots: latency per contender and shape (p50 bar, whisker to p90, marker at p99); speed-up over
PyTorch eager; accuracy against speed-up; the distribution of the per-text error of each variant;
and, for INT8 variants with a sensitivity analysis, the most sensitive nodes. Same manifest, same
bytes: matplotlib's SVG ids are salted with a constant and its date stamp is left out.
"""

from __future__ import annotations

import html
import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pipeline.report.markdown import (
    GENERATION,
    comparison_table,
    floor_table,
    render_comparison,
    sorted_deltas,
    summary_table,
)
from pipeline.report.model import Contender, Report

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Colour per precision, so a variant reads the same in every plot.
_COLOURS = {"pytorch": "#7f7f7f", "fp32": "#1f77b4", "fp16": "#2ca02c", "int8": "#d62728"}
_EXTRA = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e")
#: The smallest error drawn on a log axis (an exact variant has error 0).
_FLOOR = 1e-16

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 .passed { color: #1a7f37; } h1 .failed { color: #cf222e; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }
th { background: #f6f8fa; } td:first-child, th:first-child { text-align: left; }
tr.bad td { background: #ffebe9; }
figure { margin: 1.5em 0; } figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 0.9em; color: #555; }
ul.checks { list-style: none; padding-left: 0; } ul.checks li.bad { color: #cf222e; }
footer { font-size: 0.8em; color: #666; margin-top: 3em; }
"""

# Counts the plots the browser laid out with a visible size: every <figure class="plot"> holds
# one <svg> with drawn paths. The headless-browser test reads the attribute from the DOM.
_SCRIPT = """
window.addEventListener("load", function () {
  var plots = document.querySelectorAll("figure.plot svg");
  var drawn = 0;
  plots.forEach(function (svg) {
    var box = svg.getBoundingClientRect();
    if (box.width > 50 && box.height > 50 && svg.querySelectorAll("path").length > 3) drawn++;
  });
  document.body.setAttribute("data-plots", String(plots.length));
  document.body.setAttribute("data-plots-rendered", String(drawn));
});
"""


def _colour(c: Contender, index: int) -> str:
    if c.kind == "pytorch":
        return _COLOURS["pytorch"]
    base = _COLOURS.get(c.precision)
    # Several variants of one precision: the first takes the precision's colour.
    return base if base and index == 0 else _EXTRA[index % len(_EXTRA)]


def _colours(report: Report) -> dict[str, str]:
    seen: dict[str, int] = {}
    out = {}
    for c in report.contenders:
        key = "pytorch" if c.kind == "pytorch" else c.precision
        out[c.name] = _colour(c, seen.get(key, 0))
        seen[key] = seen.get(key, 0) + 1
    return out


@contextmanager
def _svg(width: float, height: float) -> Iterator[tuple[Figure, io.StringIO]]:
    import matplotlib
    from matplotlib.figure import Figure

    buffer = io.StringIO()
    with matplotlib.rc_context(
        {"svg.hashsalt": "tforge", "svg.fonttype": "none", "font.size": 9, "axes.grid": True}
    ):
        fig = Figure(figsize=(width, height), layout="constrained")
        yield fig, buffer
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})


def _render(width: float, height: float, draw: Callable[[Figure], None]) -> str:
    with _svg(width, height) as (fig, buffer):
        draw(fig)
    text = buffer.getvalue()
    # Drop the XML prologue and DOCTYPE: the <svg> element is embedded in HTML.
    return text[text.index("<svg") :]


def _latency_plot(report: Report, colours: dict[str, str]) -> str:
    names = [c.name for c in report.contenders]

    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, len(report.shapes), squeeze=False)[0]
        for ax, shape in zip(axes, report.shapes, strict=True):
            rows = [
                (i, c, c.latency[shape])
                for i, c in enumerate(report.contenders)
                if shape in c.latency
            ]
            ys = [i for i, _, _ in rows]
            p50 = [lat.p50_ms for _, _, lat in rows]
            ax.barh(ys, p50, color=[colours[c.name] for _, c, _ in rows], height=0.6)
            ax.errorbar(
                p50,
                ys,
                xerr=[[0] * len(rows), [lat.p90_ms - lat.p50_ms for _, _, lat in rows]],
                fmt="none",
                ecolor="#333",
                capsize=3,
                label="p90",
            )
            ax.plot([lat.p99_ms for _, _, lat in rows], ys, "k|", markersize=10, label="p99")
            ax.set_yticks(range(len(names)), names)
            ax.invert_yaxis()
            ax.set_title(shape)
            ax.set_xlabel("ms (bar p50, whisker p90, tick p99)")
            ax.set_xlim(left=0)
        for ax in axes[1:]:
            ax.tick_params(labelleft=False)

    return _render(3.2 * max(len(report.shapes), 2), 0.35 * len(names) + 1.4, draw)


def _speedup_plot(report: Report, colours: dict[str, str]) -> str:
    variants = [c for c in report.contenders if c.kind == "variant"]

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        width = 0.8 / max(len(report.shapes), 1)
        for j, shape in enumerate(report.shapes):
            xs = [i + j * width for i in range(len(variants))]
            values = [
                (c.latency[shape].speedup or 0.0) if shape in c.latency else 0.0 for c in variants
            ]
            bars = ax.bar(
                xs,
                values,
                width=width * 0.95,
                color=[colours[c.name] for c in variants],
                alpha=1.0 - 0.7 * j / max(len(report.shapes), 2),
                label=shape,
            )
            ax.bar_label(bars, fmt="%.2fx", fontsize=7)
        ax.axhline(1.0, color="#555", linestyle="--", linewidth=1)
        ax.set_xticks(
            [i + width * (len(report.shapes) - 1) / 2 for i in range(len(variants))],
            [c.name for c in variants],
            rotation=20,
            ha="right",
        )
        ax.set_ylabel("speed-up over PyTorch eager (p50)")
        ax.legend(title="shape (darker first)", fontsize=7)

    return _render(max(6.0, 0.9 * len(variants) + 2), 3.4, draw)


def _accuracy_plot(report: Report, colours: dict[str, str]) -> str | None:
    variants = [c for c in report.contenders if c.kind == "variant" and c.accuracy]
    shape = report.shapes[-1] if report.shapes else None
    if not variants or shape is None:
        return None
    cosine = any("mean_cosine" in (c.accuracy or {}) for c in variants)
    # Decoders: greedy tokens equal to PyTorch's beside the teacher-forced agreement.
    tokens = any("token_match" in (c.accuracy or {}) for c in variants)
    second = cosine or tokens

    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, 2 if second else 1, squeeze=False)[0]
        panels: list[tuple[Axes, str, str]] = []
        if cosine:
            panels.append(
                (axes[0], "mean_cosine", "1 - mean cosine vs PyTorch (log, lower is better)")
            )
        if tokens:
            panels.append((axes[0], "token_match", "greedy tokens equal to PyTorch's"))
        panels.append((axes[-1], "agreement", "agreement with PyTorch (higher is better)"))
        for ax, metric, label in panels:
            for c in variants:
                value = (c.accuracy or {}).get(metric)
                lat = c.latency.get(shape)
                if value is None or lat is None or lat.speedup is None:
                    continue
                y = max(1.0 - value, _FLOOR) if metric == "mean_cosine" else value
                ax.scatter([lat.speedup], [y], color=colours[c.name], s=40, zorder=3)
                ax.annotate(
                    c.name, (lat.speedup, y), textcoords="offset points", xytext=(5, 4), fontsize=7
                )
            # PyTorch itself in fp16 / bf16 (the floor) as the scale to read against.
            floor = report.floor or {}
            drawn = False
            for style, (precision, figures) in zip(_FLOOR_STYLES, floor.items(), strict=False):
                level = figures.get(metric)
                if level is None:
                    continue
                ax.axhline(
                    max(1.0 - level, _FLOOR) if metric == "mean_cosine" else level,
                    color="#555",
                    linestyle=style,
                    linewidth=1,
                    label=_floor_label(precision, figures),
                )
                drawn = True
            if drawn:
                ax.legend(fontsize=7, title="floor")
            ax.margins(x=0.2, y=0.1)
            if metric == "mean_cosine":
                ax.set_yscale("log")
            ax.axvline(1.0, color="#555", linestyle="--", linewidth=1)
            ax.set_xlabel(f"speed-up over PyTorch eager at {shape}")
            ax.set_ylabel(label)

    return _render(9.0 if second else 5.0, 3.6, draw)


#: Line styles of the floor's precisions in the plots.
_FLOOR_STYLES = (":", "-.", "--")


def _floor_label(precision: str, figures: dict[str, Any]) -> str:
    device = figures.get("device")
    return f"PyTorch {precision}" + (f" ({device})" if device and device != "cpu" else "")


def _distribution_plot(report: Report, colours: dict[str, str]) -> str | None:
    variants = [c for c in report.contenders if (c.accuracy or {}).get("error_quantiles")]
    if not variants:
        return None
    kinds = {str((c.accuracy or {}).get("error_kind", "error")) for c in variants}
    label = " / ".join(sorted(k.replace("_", " ") for k in kinds))

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        for c in variants:
            quantiles = (c.accuracy or {})["error_quantiles"]
            percentiles = [100 * i / (len(quantiles) - 1) for i in range(len(quantiles))]
            ax.plot(
                [max(q, _FLOOR) for q in quantiles],
                percentiles,
                color=colours[c.name],
                marker=".",
                label=c.name,
            )
        # Encoders: PyTorch itself cast to 16 bits, the distribution to read the variants against.
        for style, (precision, figures) in zip(
            _FLOOR_STYLES, (report.floor or {}).items(), strict=False
        ):
            quantiles = figures.get("error_quantiles")
            if not quantiles or figures.get("error_kind") not in kinds:
                continue
            ax.plot(
                [max(q, _FLOOR) for q in quantiles],
                [100 * i / (len(quantiles) - 1) for i in range(len(quantiles))],
                color="#555",
                linestyle=style,
                linewidth=1,
                label=f"{_floor_label(precision, figures)} (floor)",
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"per-text {label} vs PyTorch (log)")
        ax.set_ylabel("% of evaluation texts at or below")
        ax.legend(fontsize=7)

    return _render(7.0, 3.6, draw)


def _sensitivity_plots(report: Report) -> Iterator[tuple[str, str]]:
    for c in report.contenders:
        entries = (c.quantization or {}).get("sensitivity") or []
        if not entries:
            continue
        by_output = any(e.get("output_error") is not None for e in entries)
        key = "output_error" if by_output else "sqnr_db"
        rows = [e for e in entries if e.get(key) is not None]
        if not rows:
            continue

        def draw(fig: Figure, rows: Sequence[dict] = rows, key: str = key) -> None:
            ax = fig.subplots()
            labels = [str(e.get("module") or e["node"]) for e in rows]
            ax.barh(range(len(rows)), [float(e[key]) for e in rows], color=_COLOURS["int8"])
            ax.set_yticks(range(len(rows)), labels)
            ax.invert_yaxis()
            ax.set_xlabel(
                "output error with only this node in INT8 (1 - mean cosine)"
                if key == "output_error"
                else "SQNR dB (lower is more sensitive)"
            )

        caption = f"{c.name}: the most sensitive nodes" + (
            " by output error" if by_output else " by SQNR"
        )
        yield caption, _render(7.0, 0.3 * len(rows) + 1.2, draw)


def _table(header: list[str], rows: list[list[str]], bad: Sequence[bool] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="bad"' if i < len(bad) and bad[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(svg: str, caption: str) -> str:
    return f'<figure class="plot">{svg}<figcaption>{html.escape(caption)}</figcaption></figure>'


def render_html(report: Report) -> str:
    colours = _colours(report)
    state = "passed" if report.passed else "FAILED"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>tforge {html.escape(report.recipe_name)}: {state}</title>",
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>tforge build <code>{html.escape(report.recipe_name)}</code> — "
        f'<span class="{state.lower()}">{state}</span></h1>',
    ]
    model = report.model
    parts.append(
        f"<p>Model <code>{html.escape(str(model.get('source')))}</code> "
        f"({html.escape(str(model.get('model_type', '?')))}), task <b>{html.escape(report.task)}</b>"
        + (f"; {report.threads} intra-op thread(s)" if report.threads else "")
        + ".</p>"
    )
    header, rows = summary_table(report)
    parts += ["<h2>Summary</h2>", _table(header, rows)]
    if report.task != GENERATION and report.floor:
        header, rows = floor_table(report)
        parts += [
            "<h2>Floor</h2>",
            "<p>PyTorch itself cast whole to each precision (no compiler), measured on the same "
            "batches against PyTorch FP32 as the variants are: what any deployment of this model "
            "at that precision gives up.</p>",
            _table(header, rows),
        ]
    if report.shapes and report.contenders and report.contenders[0].latency:
        parts += [
            "<h2>Latency</h2>",
            _figure(_latency_plot(report, colours), "Latency per contender and shape."),
            _figure(_speedup_plot(report, colours), "Speed-up over PyTorch eager (p50 / p50)."),
        ]
    accuracy = _accuracy_plot(report, colours)
    distribution = _distribution_plot(report, colours)
    if accuracy or distribution:
        parts.append("<h2>Accuracy</h2>")
    if accuracy:
        parts.append(_figure(accuracy, "Accuracy against speed-up, per variant."))
    if distribution:
        parts.append(
            _figure(
                distribution,
                "Distribution of the per-text error against PyTorch (worst padding side).",
            )
        )
    sensitivity = list(_sensitivity_plots(report))
    if sensitivity:
        parts.append("<h2>Quantization sensitivity</h2>")
        parts += [_figure(svg, caption) for caption, svg in sensitivity]
    if report.comparison is not None:
        header, rows = comparison_table(report.comparison, marks=False)
        title = render_comparison(report.comparison).splitlines()[0].lstrip("# ")
        parts += [f"<h2>{html.escape(title)}</h2>"]
        parts += [f"<p><b>warning:</b> {html.escape(w)}</p>" for w in report.comparison.warnings]
        parts.append(_table(header, rows, [not d for d in sorted_deltas(report.comparison)]))
    parts.append("<h2>Checks</h2>")
    items = [
        f'<li class="{"ok" if c.passed else "bad"}"><b>{"ok" if c.passed else "FAILED"}</b> '
        f"{html.escape(c.source)}: {html.escape(str(c))}</li>"
        for c in report.checks
    ]
    parts.append(f'<ul class="checks">{"".join(items)}</ul>' if items else "<p>No checks.</p>")
    if report.notes:
        parts.append(
            "<h2>Notes</h2><ul>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
            + "</ul>"
        )
    parts.append("<h2>Stages</h2>")
    parts.append(
        _table(
            ["step", "this build", "seconds"],
            [
                [s.step, "from cache" if s.cached else "ran", f"{s.seconds:.2f}"]
                for s in report.stages
            ],
        )
    )
    hw = report.environment.get("hardware", {})
    versions = report.environment.get("versions", {})
    gpu = report.gpu_label()
    footer = (
        f"run {report.run_id} · tforge {report.tforge_version} · {hw.get('cpu', '?')} · "
        + (f"{gpu} · " if gpu else "")
        + " · ".join(f"{k} {v}" for k, v in versions.items())
    )
    parts += [f"<footer>{html.escape(footer)}</footer>", "</body></html>", ""]
    return "\n".join(parts)
