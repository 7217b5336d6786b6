"""``compare``: crafted reports at each threshold's boundary, noise, re-measuring, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import junitparser
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.report.compare import Thresholds, compare, confirm_latency
from pipeline.report.markdown import render_comparison
from pipeline.report.model import Contender, Latency, Report, render_json

SHAPE = "b8s128"


def latency(p50: float, spread: float = 0.01, runs: int = 50, pytorch: float = 100.0) -> Latency:
    """A timing whose p90 is ``spread`` (relative) above its p50."""
    return Latency(
        p50_ms=p50,
        p90_ms=p50 * (1 + spread),
        p99_ms=p50 * (1 + 2 * spread),
        mean_ms=p50,
        throughput=8000 / p50,
        runs=runs,
        speedup=round(pytorch / p50, 6),
    )


def variant(
    name: str = "int8",
    cosine: float = 0.999,
    worst: float = 0.99,
    agreement: float = 0.97,
    task: float | None = None,
    p50: float = 50.0,
    spread: float = 0.01,
    size: int = 50_000_000,
    pytorch: float = 100.0,
) -> Contender:
    accuracy: dict[str, Any] = {
        "mean_cosine": cosine,
        "worst_cosine": worst,
        "agreement": agreement,
    }
    if task is not None:
        accuracy["task_metric"] = task
    return Contender(
        name=name,
        kind="variant",
        target="ort-cpu",
        precision="int8",
        accuracy=accuracy,
        latency={SHAPE: latency(p50, spread, pytorch=pytorch)},
        size_bytes=size,
        peak_rss_bytes=None,
    )


def report(
    *variants: Contender,
    run: str = "run",
    pytorch: float = 100.0,
    cpu: str = "cpu",
    task: str = "feature-extraction",
) -> Report:
    torch = Contender(
        name="pytorch",
        kind="pytorch",
        target="torch-cpu",
        precision="fp32",
        accuracy=None,
        latency={SHAPE: latency(pytorch, pytorch=pytorch).model_copy(update={"speedup": None})},
        size_bytes=None,
        peak_rss_bytes=None,
    )
    return Report(
        run_id=run,
        created="2026-01-01T00:00:00+00:00",
        tforge_version="0",
        recipe_name="r",
        model={"source": "m"},
        task=task,
        shapes=[SHAPE],
        threads=2,
        contenders=[torch, *variants],
        checks=[],
        passed=True,
        stages=[],
        cached_steps=0,
        environment={"hardware": {"cpu": cpu}},
        notes=[],
    )


def verdicts(base: Contender, cand: Contender, **thresholds: Any) -> dict[str, str]:
    thresholds.setdefault("latency_basis", "p50")
    result = compare(report(base), report(cand), Thresholds(**thresholds))
    return {d.metric: d.status for d in result.deltas}


@pytest.mark.parametrize(
    ("field", "metric", "limit", "value"),
    [
        ("cosine", "mean_cosine", 0.001, 0.999),
        ("worst", "worst_cosine", 0.01, 0.99),
        ("agreement", "agreement", 0.01, 0.97),
        ("task", "task_metric", 0.01, 0.85),
    ],
)
def test_accuracy_drop_at_the_threshold_passes_and_beyond_fails(
    field: str, metric: str, limit: float, value: float
) -> None:
    base = variant(**{field: value})
    assert verdicts(base, variant(**{field: value - limit}))[metric] == "ok"
    assert verdicts(base, variant(**{field: value - limit - 1e-6}))[metric] == "regression"
    assert verdicts(base, variant(**{field: value + 2 * limit}))[metric] == "improved"


def test_latency_at_the_threshold_passes_and_beyond_fails() -> None:
    base = variant(p50=50.0)
    assert verdicts(base, variant(p50=55.0))["p50_ms"] == "ok"  # +10.0%
    assert verdicts(base, variant(p50=55.01))["p50_ms"] == "regression"
    assert verdicts(base, variant(p50=40.0))["p50_ms"] == "improved"
    assert verdicts(base, variant(p50=60.0), max_latency_regression=0.2)["p50_ms"] == "ok"
    # The default basis: the speed-up over PyTorch eager (2.0x here) may fall by 10%.
    speedup = {"latency_basis": "speedup"}
    assert verdicts(base, variant(p50=55.0), **speedup)["speedup"] == "ok"
    assert verdicts(base, variant(p50=55.01), **speedup)["speedup"] == "regression"


def test_a_latency_change_inside_the_noise_band_is_noise() -> None:
    """Medians of 50 runs with p90 40% above p50: a 15% change is within 3 standard errors."""
    base, cand = variant(p50=50.0, spread=0.4), variant(p50=57.5, spread=0.4)
    result = compare(report(base), report(cand), Thresholds(latency_basis="p50"))
    delta = next(d for d in result.deltas if d.metric == "p50_ms")
    # sd = 0.4 * 50 / 1.2816; se(median) = 1.2533 * sd / sqrt(50): 0.0553 (base), 0.0553 (cand)
    assert delta.noise == pytest.approx(3 * (2 * 0.05532**2) ** 0.5, rel=1e-3)
    assert delta.status == "noise" and result.passed
    # The same change with tight timings is a regression; and a narrower band flags it too.
    assert verdicts(variant(p50=50.0), variant(p50=57.5))["p50_ms"] == "regression"
    assert verdicts(base, cand, noise_sigmas=1.0)["p50_ms"] == "regression"


def test_speedup_basis_cancels_a_slower_machine() -> None:
    """Everything 30% slower (PyTorch too): a p50 regression, but the same speed-up."""
    base = report(variant(p50=50.0), pytorch=100.0, cpu="fast")
    cand = report(variant(p50=65.0, pytorch=130.0), pytorch=130.0, cpu="slow")
    by_p50 = compare(base, cand, Thresholds(latency_basis="p50"))
    by_speedup = compare(base, cand, Thresholds())  # the default basis
    assert not by_p50.passed
    assert by_speedup.passed
    assert [d.metric for d in by_speedup.deltas if d.shape] == ["speedup"]
    assert any("different hardware" in w for w in by_p50.warnings)
    assert any("PyTorch eager itself changed +30.0%" in w for w in by_p50.warnings)


def _on_gpu(built: Report, *names: str, driver: str = "580.1") -> Report:
    """``built`` as if its variants ran on ORT CUDA on a machine with GPUs ``names``."""
    gpus = [
        {"name": n, "compute_capability": "9.0", "driver": driver, "memory_mb": 1} for n in names
    ]
    contenders = [
        c.model_copy(update={"target": "torch-cuda" if c.kind == "pytorch" else "ort-cuda"})
        for c in built.contenders
    ]
    hardware = {**built.environment["hardware"], "gpus": gpus}
    return built.model_copy(
        update={"contenders": contenders, "environment": {"hardware": hardware}}
    )


def _gpu_warnings(base: Report, cand: Report) -> list[str]:
    return [w for w in compare(base, cand, Thresholds()).warnings if "GPU" in w]


def test_a_gpu_build_on_another_gpu_is_named_and_the_report_footers_show_it() -> None:
    h100, h200 = (
        _on_gpu(report(variant()), "NVIDIA H100"),
        _on_gpu(report(variant()), "NVIDIA H200"),
    )
    assert h200.gpu_label() == "NVIDIA H200 (driver 580.1)"
    assert _gpu_warnings(h100, h200) == [
        "different GPUs: baseline on NVIDIA H100 (driver 580.1), candidate on NVIDIA H200 (driver 580.1)"
    ]
    assert _gpu_warnings(h200, h200) == []
    # tforge runs on the first GPU CUDA sees: more GPUs beside it change nothing, a new
    # driver does.
    eight = _on_gpu(report(variant()), *["NVIDIA H200"] * 8)
    assert eight.gpu_label() == "NVIDIA H200 (driver 580.1)" and _gpu_warnings(h200, eight) == []
    newer = _on_gpu(report(variant()), "NVIDIA H200", driver="590.2")
    assert _gpu_warnings(h200, newer) == [
        "different GPUs: baseline on NVIDIA H200 (driver 580.1), candidate on NVIDIA H200 (driver 590.2)"
    ]
    # A CPU build on a machine that has a GPU did not run on it: no label, no warning.
    cpu = report(variant()).model_copy(
        update={
            "environment": {
                "hardware": {"cpu": "cpu", "gpus": h200.environment["hardware"]["gpus"]}
            }
        }
    )
    assert cpu.gpu_label() is None and _gpu_warnings(cpu, report(variant())) == []
    assert "baseline on no GPU, candidate on NVIDIA H200" in " ".join(_gpu_warnings(cpu, h200))
    # A GPU build from before GPUs were recorded, against a GPU build and a CPU build.
    unnamed = _on_gpu(report(variant()))
    assert "baseline on a GPU its manifest does not name" in " ".join(_gpu_warnings(unnamed, h200))
    assert _gpu_warnings(cpu, unnamed) == [
        "different GPUs: baseline on no GPU, candidate on a GPU its manifest does not name"
    ]
    from pipeline.report.html import render_html
    from pipeline.report.markdown import render_markdown

    versions = {"onnxruntime-gpu": "1.31.1", "tensorrt": "10.13.3.9"}
    shown = h200.model_copy(update={"environment": {**h200.environment, "versions": versions}})
    assert (
        "cpu (? cores) · NVIDIA H200 (driver 580.1) · onnxruntime-gpu 1.31.1 · tensorrt 10.13.3.9"
        in (render_markdown(shown))
    )
    assert "NVIDIA H200" not in render_markdown(cpu)
    assert "· NVIDIA H200 (driver 580.1) ·" in render_html(h200)


def test_size_growth_at_the_threshold_passes_and_beyond_fails() -> None:
    base = variant(size=100_000_000)
    assert verdicts(base, variant(size=105_000_000))["size_mb"] == "ok"
    assert verdicts(base, variant(size=105_000_001))["size_mb"] == "regression"


def test_a_missing_variant_fails_and_a_new_one_is_listed() -> None:
    result = compare(
        report(variant("a"), variant("b")), report(variant("a"), variant("c")), Thresholds()
    )
    status = {(d.variant, d.metric): d.status for d in result.deltas}
    assert status[("b", "variant")] == "missing"
    assert status[("c", "variant")] == "new"
    assert not result.passed and [d.variant for d in result.regressions] == ["b"]
    text = render_comparison(result)
    assert "1 regression" in text and "❌ missing" in text


def _drop_timing(r: Report, name: str, shape: str = SHAPE) -> Report:
    contenders = [
        c.model_copy(update={"latency": {k: v for k, v in c.latency.items() if k != shape}})
        if c.name == name
        else c
        for c in r.contenders
    ]
    return r.model_copy(update={"contenders": contenders})


@pytest.mark.parametrize("basis", ["p50", "speedup"])
def test_a_figure_the_candidate_stopped_measuring_fails(basis: str) -> None:
    """An untimed variant, an untimed shape, a lost PyTorch timing, a lost size: each is a
    ``missing`` regression, not a silent pass."""
    t = Thresholds(latency_basis=basis)
    metric = "p50_ms" if basis == "p50" else "speedup"
    base = report(variant())

    def missing(cand: Report) -> list[tuple[str, str | None, str | None]]:
        result = compare(base, cand, t)
        assert not result.passed
        return [(d.metric, d.shape, d.note) for d in result.deltas if d.status == "missing"]

    untimed = report(variant()).model_copy(update={"shapes": []})
    assert missing(_drop_timing(untimed, "int8")) == [
        (metric, SHAPE, "shape not timed in the candidate")
    ]
    assert missing(_drop_timing(report(variant()), "int8")) == [
        (metric, SHAPE, "not timed in the candidate")
    ]
    # The baseline's figure is kept beside the gap.
    gap = compare(base, _drop_timing(report(variant()), "int8"), t).regressions[0]
    assert gap.baseline == (50.0 if basis == "p50" else 2.0) and gap.candidate is None
    sizeless = report(variant().model_copy(update={"size_bytes": None}))
    assert missing(sizeless) == [("size_mb", None, "no size in the candidate")]
    no_cosine = variant().model_copy(update={"accuracy": {"agreement": 0.97}})
    assert {m for m, *_ in missing(report(no_cosine))} == {"mean_cosine", "worst_cosine"}
    no_pytorch = _drop_timing(report(variant()), "pytorch")
    if basis == "speedup":
        assert missing(no_pytorch) == [
            ("speedup", SHAPE, "no PyTorch timing in the candidate to take a speed-up from")
        ]
        # The baseline lacking it is not the candidate's fault: a warning, no verdict.
        result = compare(no_pytorch, base, t)
        assert result.passed and any(
            "compare with --latency-basis p50" in w for w in result.warnings
        )
    else:
        assert compare(base, no_pytorch, t).passed


def _with_checks(r: Report, *checks: Any) -> Report:
    return r.model_copy(update={"checks": list(checks), "passed": all(checks)})


def test_a_check_the_candidate_failed_fails_the_comparison() -> None:
    """NaN outputs leave agreement finite (argmax) and the error figures empty; the candidate's
    own tolerance check is what fails, and compare must not pass it."""
    from pipeline.manifest import check

    def tol(value: float | None) -> Any:
        return check("tolerance", "int8", "max_abs_error", value, 0.5, "max")

    nan = variant().model_copy(
        update={"accuracy": {"agreement": 0.995, "nonfinite_outputs": 48, "max_abs_error": None}}
    )
    clean = variant().model_copy(
        update={"accuracy": {"agreement": 0.995, "nonfinite_outputs": 0, "max_abs_error": 0.2}}
    )
    base = _with_checks(report(clean), tol(0.2))
    cand = _with_checks(report(nan), tol(None))
    result = compare(base, cand, Thresholds(latency_basis="p50"))
    status = {d.metric: (d.status, d.note) for d in result.deltas}
    assert not result.passed
    assert status["nonfinite_outputs"] == ("regression", None)
    assert status["tolerance:max_abs_error"][0] == "regression"
    assert "passed in the baseline" in str(status["tolerance:max_abs_error"][1])
    text = render_comparison(result)
    assert "| int8 | nonfinite_outputs | 0 | 48 | +48 | no rise | ❌ regression |" in text
    # Failed in both: still a failed candidate, said so.
    both = compare(_with_checks(report(nan), tol(None)), cand, Thresholds(latency_basis="p50"))
    assert not both.passed
    assert [d.note for d in both.regressions] == [
        "the candidate's own check failed: int8 max_abs_error: not measured (no figure), "
        "limit <= 0.5: FAILED; failed in the baseline too"
    ]
    # tforge build --baseline leaves its own checks out of the comparison (its report has them).
    assert all(
        not d.metric.startswith("tolerance:")
        for d in compare(base, cand, Thresholds(), checks=False).deltas
    )


def test_unlike_builds_are_warned_about() -> None:
    base = report(variant()).model_copy(
        update={
            "model": {"source": "a", "sha256": "a" * 64},
            "inputs": {"evaluation": "e" * 64, "calibration": "c" * 64},
        }
    )
    same = compare(base, base, Thresholds())
    assert same.warnings == []
    other_accuracy = {**variant().accuracy, "samples": 100}  # type: ignore[dict-item]
    cand = report(
        variant().model_copy(update={"accuracy": other_accuracy}), task="sequence-classification"
    ).model_copy(
        update={
            "model": {"source": "b", "sha256": "b" * 64},
            "inputs": {"evaluation": "f" * 64, "calibration": "c" * 64},
        }
    )
    base = base.model_copy(
        update={
            "contenders": [
                c.model_copy(update={"accuracy": {**c.accuracy, "samples": 256}})
                if c.accuracy
                else c
                for c in base.contenders
            ]
        }
    )
    warnings = compare(base, cand, Thresholds()).warnings
    assert warnings[:4] == [
        f"different models: baseline a ({'a' * 12}), candidate b ({'b' * 12}); accuracy deltas "
        "compare other weights",
        "different tasks: baseline feature-extraction, candidate sequence-classification",
        f"different evaluation data: baseline {'e' * 12}, candidate {'f' * 12} (sha256); "
        "accuracy is measured on other texts",
        "different numbers of evaluation texts: baseline 256, candidate 100",
    ]
    cuda = _on_gpu(report(variant()), "NVIDIA H200")
    assert any(
        "PyTorch eager ran as torch-cpu in the baseline and torch-cuda in the candidate" in w
        for w in compare(report(variant()), cuda, Thresholds()).warnings
    )


def test_a_latency_regression_stands_only_if_every_measurement_shows_it() -> None:
    base = report(variant(p50=50.0))
    slow = report(variant(p50=60.0), run="slow")
    calls = []

    def fast_again() -> Report:
        calls.append(1)
        return report(variant(p50=51.0), run="again")

    p50 = Thresholds(latency_basis="p50")
    result, latest = confirm_latency(base, slow, p50, fast_again, times=3)
    assert len(calls) == 1 and latest.run_id == "again"
    assert result.passed and result.remeasured == 1
    assert next(d for d in result.deltas if d.shape).status == "ok"

    calls.clear()

    def slow_again() -> Report:
        calls.append(1)
        return report(variant(p50=60.0 + len(calls)), run="again")

    result, _ = confirm_latency(base, slow, p50, slow_again, times=2)
    assert len(calls) == 2 and not result.passed
    delta = next(d for d in result.deltas if d.shape)
    assert delta.status == "regression" and delta.note == "in all 3 measurements"
    # No regression: nothing is re-measured.
    result, _ = confirm_latency(base, base, p50, slow_again, times=2)
    assert len(calls) == 2 and result.passed and result.remeasured == 0


def test_a_regression_reproduced_only_sometimes_is_noise() -> None:
    base = report(variant(p50=50.0))
    measurements = iter([report(variant(p50=51.0)), report(variant(p50=60.0))])
    result, _ = confirm_latency(
        base,
        report(variant(p50=60.0)),
        Thresholds(latency_basis="p50"),
        lambda: next(measurements),
        times=2,
    )
    # The first re-measurement cleared it, so the loop stopped there.
    assert result.passed and result.remeasured == 1


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def write(path: Path, r: Report) -> Path:
    path.write_text(render_json(r))
    return path


def test_cli_compare_exits_3_on_regression_and_writes_junit(tmp_path: Path) -> None:
    base = write(tmp_path / "base.json", report(variant(cosine=0.999), run="base"))
    same = write(tmp_path / "same.json", report(variant(cosine=0.999), run="same"))
    worse = write(tmp_path / "worse.json", report(variant(cosine=0.99), run="worse"))
    code, output = invoke("compare", str(base), str(same))
    assert code == 0, output
    assert "`same` against baseline `base`: no regression" in output
    code, output = invoke("compare", str(base), str(same), "--quiet")
    assert (code, output) == (0, "against baseline base: no regression\n")

    junit = tmp_path / "junit.xml"
    markdown = tmp_path / "diff.md"
    code, output = invoke(
        "compare", str(base), str(worse), "--junit", str(junit), "--markdown", str(markdown)
    )
    assert code == 3
    assert "1 regression(s)" in output and "int8 mean_cosine: regression" in output
    assert "Traceback" not in output
    assert markdown.read_text().startswith("# `worse` against baseline `base`: 1 regression")
    xml = junitparser.JUnitXml.fromfile(str(junit))
    cases = [(case.classname, case.name, case.is_passed) for suite in xml for case in suite]
    assert ("tforge.compare.int8", "mean_cosine", False) in cases
    assert ("tforge.compare.int8", "speedup @b8s128", True) in cases
    assert sum(not passed for *_, passed in cases) == 1

    # Looser thresholds turn the same pair into a pass.
    code, _ = invoke("compare", str(base), str(worse), "--max-cosine-drop", "0.01")
    assert code == 0


def test_cli_compare_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    good = write(tmp_path / "good.json", report(variant()))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    code, output = invoke("compare", str(good), str(broken))
    assert code == 1 and "is not JSON" in output and "Traceback" not in output
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"schema_version": 99}))
    code, output = invoke("compare", str(future), str(good))
    assert code == 1 and "report schema version 99; this tforge reads versions 1, 2, 3" in output
    code, output = invoke("compare", str(good), str(good), "--max-latency-regression", "-5")
    assert code == 2 and "'--max-latency-regression': -5.0 is not in the range x>=0" in output
    assert "pydantic" not in output
    code, output = invoke("compare", str(good), str(good), "--remeasure", "-1")
    assert code == 2 and "'--remeasure': -1 is not in the range x>=0" in output
    code, output = invoke("compare", str(good), str(good), "--remeasure", "2")
    assert code == 1 and "--remeasure needs CANDIDATE to be a run folder" in output


def test_the_speedup_change_comes_from_the_medians_not_the_rounded_speedups() -> None:
    """Reports round speed-ups to 3 decimals: 0.051x against 0.046x reads as 10.9% slower,
    while the medians say exactly 10.0%, at the threshold."""

    def slow(p50: float) -> Contender:
        timing = latency(p50).model_copy(update={"speedup": round(100.0 / p50, 3)})
        return variant().model_copy(update={"latency": {SHAPE: timing}})

    result = compare(report(slow(1980.0)), report(slow(2178.0)), Thresholds())
    delta = next(d for d in result.deltas if d.shape)
    assert (delta.baseline, delta.candidate) == (0.051, 0.046)
    assert delta.change == pytest.approx(0.10) and delta.status == "ok"


def test_only_latency_regressions_are_re_measured() -> None:
    """A shape the candidate did not time, or a failed gate of its own, is no timing noise: no
    re-measurement can clear it, and its note stays."""
    from pipeline.manifest import check

    calls: list[int] = []

    def again() -> Report:
        calls.append(1)
        return report(variant(), run="again")

    untimed = _drop_timing(report(variant()), "int8")
    result, _ = confirm_latency(report(variant()), untimed, Thresholds(), again, times=3)
    assert calls == [] and not result.passed
    gate = check("gate", "int8", "speedup", 1.9, 2.0, "min", shape=SHAPE)
    gated = _with_checks(report(variant()), gate)
    result, _ = confirm_latency(report(variant()), gated, Thresholds(), again, times=3)
    assert calls == [] and [d.metric for d in result.regressions] == ["gate:speedup"]
    assert result.regressions[0].note.startswith("the candidate's own check failed")
