"""Every format rendered from one fixed manifest: golden Markdown, JUnit, HTML in a real browser.

``fixtures/manifest.json`` is a real build (``python -m tests.report.make_fixture``): a tiny BERT
with FP32, INT8 and budgeted INT8 variants, gates, and a comparison with an earlier build.
After a deliberate change of a renderer, ``TFORGE_UPDATE_GOLDEN=1 pytest tests/report`` rewrites
the golden files; review their diff like code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import junitparser
import pytest
from PIL import Image

from pipeline.manifest import Manifest
from pipeline.report import FILES, build_report, render, render_all
from pipeline.report.model import REPORT_SCHEMA_VERSION, json_schema, load_report, read_report

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    path = FIXTURES / "manifest.json"
    return Manifest.parse(path.read_text(), str(path))


def golden(name: str, text: str) -> None:
    path = FIXTURES / name
    if os.environ.get("TFORGE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden file"


def test_markdown_matches_the_golden_file(manifest: Manifest) -> None:
    golden("report.md", render(build_report(manifest), "markdown"))


def test_json_round_trips_and_the_documented_schema_is_current(manifest: Manifest) -> None:
    report = build_report(manifest)
    text = render(report, "json")
    assert read_report(text, "report.json") == report
    assert report.comparison is not None and not report.passed
    fp32 = next(c for c in report.contenders if c.name == "fp32")
    quantiles = (fp32.accuracy or {})["error_quantiles"]
    assert len(quantiles) == 21 and quantiles == sorted(quantiles)
    documented = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    assert documented == json_schema(), "run: tforge report --schema > docs/report.schema.json"


def test_older_reports_are_read_and_other_versions_are_refused(
    manifest: Manifest, tmp_path: Path
) -> None:
    data = json.loads(render(build_report(manifest), "json"))
    sha = {i.name: i.sha256 for i in manifest.inputs}
    assert data["schema_version"] == 3 and data["inputs"] == sha and "evaluation" in sha
    data.pop("comparison")
    data.pop("inputs")
    for version in (1, 2):
        data["schema_version"] = version
        (tmp_path / "report.json").write_text(json.dumps(data))
        old, manifest_path = load_report(tmp_path)
        assert old.schema_version == REPORT_SCHEMA_VERSION and old.comparison is None
        assert old.inputs is None and manifest_path is None
    data["schema_version"] = 4
    with pytest.raises(Exception, match=r"version 4; this tforge reads versions 1, 2, 3"):
        read_report(json.dumps(data), "new.json")


def test_junit_has_one_testcase_per_check_and_comparison(
    manifest: Manifest, tmp_path: Path
) -> None:
    report = build_report(manifest)
    path = tmp_path / "junit.xml"
    path.write_text(render(report, "junit"))
    xml = junitparser.JUnitXml.fromfile(str(path))
    suites = {suite.name: suite for suite in xml}
    assert set(suites) == {
        "tforge.fusion",
        "tforge.tolerance",
        "tforge.budget",
        "tforge.gate",
        "tforge.compare",
    }
    assert report.comparison is not None
    assert suites["tforge.compare"].tests == len(report.comparison.deltas)
    assert sum(s.tests for s in suites.values()) == len(report.checks) + len(
        report.comparison.deltas
    )
    failed = [(case.classname, case.name) for suite in xml for case in suite if not case.is_passed]
    expected = [
        (f"tforge.{c.source}.{c.variant}", c.metric + (f" @{c.shape}" if c.shape else ""))
        for c in report.checks
        if not c.passed
    ] + [
        (f"tforge.compare.{d.variant}", d.metric + (f" @{d.shape}" if d.shape else ""))
        for d in report.comparison.regressions
    ]
    assert failed == expected and xml.failures == len(expected)


def test_cli_report_rewrites_every_format(manifest: Manifest, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    result = CliRunner().invoke(
        cli,
        ["report", str(FIXTURES / "manifest.json"), "--output", str(tmp_path), "--format", "junit"],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith('<?xml version="1.0"')
    expected = render_all(build_report(manifest))
    for name in FILES.values():
        assert (tmp_path / name).read_text() == expected[name]
    schema = CliRunner().invoke(cli, ["report", "--schema", str(tmp_path)])
    assert json.loads(schema.output) == json_schema()


def _chromium() -> str | None:
    return next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )


@pytest.mark.skipif(
    _chromium() is None, reason="needs Debian's chromium (apt-get install chromium)"
)
def test_html_is_self_contained_and_its_plots_render_in_chromium(
    manifest: Manifest, tmp_path: Path
) -> None:
    report = build_report(manifest)
    page = render(report, "html")
    assert page == render(report, "html"), "same manifest, same bytes"
    # Self-contained: no external scripts, styles, images or fonts.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page
    path = tmp_path / "report.html"
    path.write_text(page)
    browser = [_chromium() or "chromium", "--headless", "--no-sandbox", "--disable-gpu"]
    # No network for the page: a fetch it tried would fail, and a missing plot would show.
    browser += ["--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,2400"]
    dom = subprocess.run(
        [*browser, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    plots = int(re.search(r'data-plots="(\d+)"', body.group()).group(1))  # type: ignore[union-attr]
    drawn = int(re.search(r'data-plots-rendered="(\d+)"', body.group()).group(1))  # type: ignore[union-attr]
    # Latency, speed-up, accuracy vs speed-up, error distribution, sensitivity of both INT8
    # variants: six plots, all laid out with a visible size.
    assert (plots, drawn) == (6, 6)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*browser, f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120
    )
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    # The plots' bar colours are on the page (FP32 blue and INT8 red, as drawn by matplotlib).
    present = {rgb for count, rgb in colours if count > 200}
    assert (0x1F, 0x77, 0xB4) in present and (0xD6, 0x27, 0x28) in present
