"""Reports: pure functions of a build's manifest (JSON, Markdown) and the checks behind them."""

from pipeline.report.markdown import render_markdown
from pipeline.report.model import Report, build_report, render_json

__all__ = ["Report", "build_report", "render_json", "render_markdown"]
