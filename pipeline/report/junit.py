"""``junit.xml``: a build's checks and its comparison as JUnit test results.

CI systems (GitHub Actions test reporters, GitLab, Jenkins, Azure) render JUnit XML natively, so
a failed gate shows up as a failed test with its figure and limit. One ``testsuite`` per kind of
check (fusion, tolerance, budget, gate) and one for the comparison with a baseline; one
``testcase`` per check or compared figure, ``classname`` ``tforge.<suite>.<variant>``. A failed
check is a ``<failure>``; a figure that was not measured is a ``<failure>`` too (a gate that
cannot be evaluated has not passed). The file is a pure function of the report: no host names
or clocks beyond the build's own start time.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from pipeline.manifest import Check
from pipeline.report.model import Comparison, Delta, Report

SOURCES = ("fusion", "tolerance", "budget", "gate")


def _case(suite: ET.Element, classname: str, name: str, failure: str | None, text: str) -> None:
    case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
    if failure is not None:
        element = ET.SubElement(case, "failure", message=failure, type="tforge")
        element.text = text
    out = ET.SubElement(case, "system-out")
    out.text = text


def _suite(root: ET.Element, name: str, timestamp: str) -> ET.Element:
    return ET.SubElement(root, "testsuite", name=name, timestamp=timestamp)


def _check_case(suite: ET.Element, kind: str, c: Check) -> None:
    name = c.metric + (f" @{c.shape}" if c.shape else "")
    text = f"{kind}: {c}" + (f" ({c.note})" if c.note and c.value is not None else "")
    _case(suite, f"tforge.{kind}.{c.variant}", name, None if c.passed else str(c), text)


def delta_text(d: Delta) -> str:
    """One line: the figure, both values, the change, what was allowed, and why."""
    parts = [f"{d.variant} {d.metric}" + (f" @{d.shape}" if d.shape else "") + f": {d.status}"]
    if d.baseline is not None or d.candidate is not None:
        parts.append(f"baseline {d.baseline!r}, candidate {d.candidate!r}")
    if d.change is not None:
        parts.append(f"change {d.change:+.6g}, allowed {d.limit!r}")
    if d.noise is not None:
        parts.append(f"noise band {d.noise:.4g}")
    if d.note:
        parts.append(d.note)
    return "; ".join(parts)


def _finish(suite: ET.Element) -> tuple[int, int]:
    cases = suite.findall("testcase")
    failures = sum(1 for case in cases if case.find("failure") is not None)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    suite.set("time", "0")
    return len(cases), failures


def render_junit(
    report: Report, comparison: Comparison | None = None, include_checks: bool = True
) -> str:
    """JUnit XML for the report's checks (unless ``include_checks`` is false) and for ``comparison``
    (default: the report's own)."""
    comparison = comparison or report.comparison
    root = ET.Element("testsuites", name=f"tforge {report.recipe_name}")
    for kind in SOURCES if include_checks else ():
        checks = [c for c in report.checks if c.source == kind]
        if not checks:
            continue
        suite = _suite(root, f"tforge.{kind}", report.created)
        for c in checks:
            _check_case(suite, kind, c)
    if comparison is not None:
        suite = _suite(root, "tforge.compare", report.created)
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="baseline", value=comparison.baseline_run)
        ET.SubElement(props, "property", name="candidate", value=comparison.candidate_run)
        for d in comparison.deltas:
            name = d.metric + (f" @{d.shape}" if d.shape else "")
            text = delta_text(d)
            _case(suite, f"tforge.compare.{d.variant}", name, None if d else text, text)
    total = failed = 0
    for suite in root.findall("testsuite"):
        tests, failures = _finish(suite)
        total += tests
        failed += failures
    root.set("tests", str(total))
    root.set("failures", str(failed))
    root.set("errors", "0")
    root.set("time", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
