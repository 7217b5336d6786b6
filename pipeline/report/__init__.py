"""Reports: pure functions of a build's manifest (JSON, Markdown, HTML, JUnit) and the checks behind them."""

from pipeline.report.markdown import render_markdown
from pipeline.report.model import Report, build_report, render_json

#: File name per format, as written into a run folder.
FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "html": "report.html",
    "junit": "junit.xml",
}


def render(report: Report, fmt: str) -> str:
    """One format of ``report``: json, markdown, html or junit."""
    if fmt == "json":
        return render_json(report)
    if fmt == "markdown":
        return render_markdown(report)
    if fmt == "html":
        from pipeline.report.html import render_html  # matplotlib: imported when needed

        return render_html(report)
    if fmt == "junit":
        from pipeline.report.junit import render_junit

        return render_junit(report)
    raise ValueError(f"unknown report format {fmt!r} (known: {', '.join(FILES)})")


def render_all(report: Report) -> dict[str, str]:
    """Every format, keyed by its file name in the run folder."""
    return {name: render(report, fmt) for fmt, name in FILES.items()}


__all__ = [
    "FILES",
    "Report",
    "build_report",
    "render",
    "render_all",
    "render_json",
    "render_markdown",
]
