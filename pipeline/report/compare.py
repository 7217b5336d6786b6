"""``tforge compare``: a candidate build against a stored baseline, with relative thresholds.

Per variant present in both reports:

* accuracy (mean and worst cosine, agreement, task metric): a drop larger than the threshold,
  in absolute units, is a regression; so is any rise in non-finite (NaN or infinite) outputs;
* latency, per shape both timed: the relative change of the median (``p50``) or, with
  ``latency_basis="speedup"``, of the speed-up over PyTorch eager measured in the same build —
  which cancels a slower or busier machine. A change beyond the threshold is a regression only if
  it is also larger than the run-to-run noise: ``noise_sigmas`` standard errors of the medians
  involved, each estimated from that contender's own spread (``(p90 - p50) / 1.28`` is the
  standard deviation of a normal distribution; the median's standard error is
  ``1.2533 * sd / sqrt(runs)``). A change inside that band is reported as ``noise``;
* size: relative growth beyond the threshold is a regression.

A figure the baseline has and the candidate lacks (a variant, an accuracy figure, a timed shape,
a size) is a regression (``missing``): a candidate that stopped measuring something must not
pass for one that kept it. A new variant or figure is listed.

A check the candidate failed (a tolerance, a gate, a fusion count: its own report's ``checks``)
is a regression too, noted when the baseline failed it as well: a candidate whose outputs broke
(NaN) or left its tolerance fails the comparison even where every figure above is missing or
within its threshold.

Differences in hardware or thread count are warnings: absolute latency across machines means
little, and the warning says to use the speed-up basis. So are differences that make accuracy
deltas compare unlike things: another model (weights), task, evaluation data or number of
evaluation texts, or PyTorch eager timed on another device.

:func:`confirm_latency` re-measures the candidate before a latency regression is declared: one
stands only if every measurement shows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.report.model import Comparison, Contender, Delta, Latency, Report

#: Thresholds are compared after rounding away float noise: a drop of exactly the threshold
#: (0.999 - 0.998 is 0.0010000000000000009 in binary) is not a regression.
_EPS = 1e-9
#: Normal distribution: (p90 - p50) / sd, and the median's standard error over sd / sqrt(n).
_P90_SDS = 1.2816
_MEDIAN_SE = 1.2533


class Thresholds(BaseModel):
    """How much worse a candidate may be than its baseline before it is a regression."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_cosine_drop: float = Field(0.001, ge=0, description="Mean cosine, absolute.")
    max_worst_cosine_drop: float = Field(0.01, ge=0, description="Worst cosine, absolute.")
    max_agreement_drop: float = Field(0.01, ge=0, description="Agreement, absolute.")
    max_task_metric_drop: float = Field(0.01, ge=0, description="Task metric, absolute.")
    max_token_match_drop: float = Field(
        0.01, ge=0, description="Decoders: greedy token match, absolute."
    )
    max_perplexity_increase: float = Field(
        0.01,
        ge=0,
        description="Decoders: growth of the perplexity increase over PyTorch, absolute "
        "(0.01 = one percentage point).",
    )
    max_latency_regression: float = Field(0.10, ge=0, description="Relative: 0.10 = 10% slower.")
    max_size_growth: float = Field(0.05, ge=0, description="Relative: 0.05 = 5% larger.")
    #: speedup (default): the speed-up over PyTorch eager timed in the same build, which cancels
    #: a slower or busier machine; p50: the variant's own median. Measured on unchanged MiniLM
    #: builds (benchmarks/compare_noise.py): 0 of 180 false regressions with speedup and the
    #: noise band, 13 of 180 with p50.
    latency_basis: Literal["p50", "speedup"] = "speedup"
    noise_sigmas: float = Field(3.0, ge=0, description="Width of the latency noise band.")


#: (accuracy figure, threshold field, higher is better).
ACCURACY = (
    ("mean_cosine", "max_cosine_drop", True),
    ("worst_cosine", "max_worst_cosine_drop", True),
    ("agreement", "max_agreement_drop", True),
    ("task_metric", "max_task_metric_drop", True),
    # Decoders: greedy tokens equal to PyTorch's, and the perplexity increase over PyTorch's.
    ("token_match", "max_token_match_drop", True),
    ("perplexity_increase", "max_perplexity_increase", False),
)


#: Accuracy figures where a rise is a loss.
LOWER_IS_BETTER = frozenset(metric for metric, _, higher in ACCURACY if not higher) | {
    "nonfinite_outputs"
}


def _relative_se(lat: Latency) -> float:
    """Standard error of the median over the median, from the run's own spread."""
    sd = max(lat.p90_ms - lat.p50_ms, 0.0) / _P90_SDS
    return _MEDIAN_SE * sd / math.sqrt(max(lat.runs, 1)) / lat.p50_ms


def _accuracy_deltas(base: Contender, cand: Contender, t: Thresholds) -> list[Delta]:
    deltas = []
    for metric, field, higher_is_better in ACCURACY:
        b = (base.accuracy or {}).get(metric)
        c = (cand.accuracy or {}).get(metric)
        if b is None and c is None:
            continue
        limit = getattr(t, field)
        change = None if b is None or c is None else c - b
        status: Literal["ok", "improved", "regression", "missing", "new"]
        if change is None:
            status = "missing" if c is None else "new"
        else:
            gain = change if higher_is_better else -change
            status = "regression" if -gain > limit + _EPS else "improved" if gain > limit else "ok"
        note = None
        if change is None:
            broken = c is None and (cand.accuracy or {}).get("nonfinite_outputs")
            note = (
                "no figure: the candidate's outputs hold NaN or infinite values"
                if broken
                else "not measured in the candidate"
                if c is None
                else "new figure"
            )
        deltas.append(
            Delta(
                variant=cand.name,
                metric=metric,
                baseline=b,
                candidate=c,
                change=change,
                limit=-limit if higher_is_better else limit,
                status=status,
                note=note,
            )
        )
    deltas += _nonfinite_delta(base, cand)
    return deltas


def _nonfinite_delta(base: Contender, cand: Contender) -> list[Delta]:
    """NaN or infinite outputs: any more than the baseline had is a regression (no threshold:
    a broken output is not a rounding difference)."""
    b = (base.accuracy or {}).get("nonfinite_outputs")
    c = (cand.accuracy or {}).get("nonfinite_outputs")
    if b is None and c is None:
        return []
    status: Literal["ok", "improved", "regression", "missing"]
    if c is None:
        status, change = "missing", None
    else:
        change = c - (b or 0)
        status = "regression" if change > 0 else "improved" if change < 0 else "ok"
    return [
        Delta(
            variant=cand.name,
            metric="nonfinite_outputs",
            baseline=b,
            candidate=c,
            change=change,
            limit=0,
            status=status,
            note="not measured in the candidate" if c is None else None,
        )
    ]


def _latency_deltas(
    base: Report, cand: Report, name: str, t: Thresholds, warnings: list[str]
) -> list[Delta]:
    b_c = next(c for c in base.contenders if c.name == name)
    c_c = next(c for c in cand.contenders if c.name == name)
    b_pt = next(c for c in base.contenders if c.kind == "pytorch")
    c_pt = next(c for c in cand.contenders if c.kind == "pytorch")
    metric = "p50_ms" if t.latency_basis == "p50" else "speedup"
    deltas = []
    for shape in base.shapes:
        b, c = b_c.latency.get(shape), c_c.latency.get(shape)
        if b is None:
            continue
        if c is None:
            why = "not timed" if shape in cand.shapes else "shape not timed"
            value = b.p50_ms if metric == "p50_ms" else b.speedup
            deltas.append(
                _absent(name, metric, f"{why} in the candidate", shape=shape, baseline=value)
            )
            continue
        parts = [b, c]
        if t.latency_basis == "p50":
            b_value, c_value = b.p50_ms, c.p50_ms
            change = c.p50_ms / b.p50_ms - 1
        else:
            pb, pc = b_pt.latency.get(shape), c_pt.latency.get(shape)
            if pb is None or b.speedup is None:
                warnings.append(
                    f"{name} @{shape}: the baseline has no PyTorch timing to take a speed-up "
                    "from; compare with --latency-basis p50"
                )
                continue
            if pc is None or c.speedup is None:
                note = "no PyTorch timing in the candidate to take a speed-up from"
                deltas.append(_absent(name, metric, note, shape=shape, baseline=b.speedup))
                continue
            parts += [pb, pc]
            b_value, c_value = b.speedup, c.speedup
            # A lower speed-up is a slower variant: its relative slowdown. From the medians,
            # not the reports' speed-ups (rounded to 3 decimals: a percent of a 0.1x one).
            change = (pb.p50_ms / b.p50_ms) / (pc.p50_ms / c.p50_ms) - 1
        noise = t.noise_sigmas * math.sqrt(sum(_relative_se(p) ** 2 for p in parts))
        limit = t.max_latency_regression
        status: Literal["ok", "improved", "noise", "regression"] = "ok"
        if change > limit + _EPS:
            status = "regression" if change > noise else "noise"
        elif -change > max(limit, noise):
            status = "improved"
        deltas.append(
            Delta(
                variant=name,
                metric=metric,
                shape=shape,
                baseline=b_value,
                candidate=c_value,
                change=change,
                limit=limit,
                noise=noise,
                status=status,
            )
        )
    return deltas


def _absent(
    variant: str,
    metric: str,
    note: str,
    status: Literal["missing", "new"] = "missing",
    shape: str | None = None,
    baseline: float | None = None,
) -> Delta:
    """A figure (or a whole variant: metric ``variant``) on one side only; ``missing`` when the
    baseline has it and the candidate lacks it."""
    return Delta(
        variant=variant,
        metric=metric,
        shape=shape,
        baseline=baseline,
        candidate=None,
        change=None,
        limit=None,
        status=status,
        note=note,
    )


def _size_delta(base: Contender, cand: Contender, t: Thresholds) -> list[Delta]:
    if not base.size_bytes:
        return []
    if cand.size_bytes is None:
        return [
            _absent(
                cand.name, "size_mb", "no size in the candidate", baseline=base.size_bytes / 1e6
            )
        ]
    change = cand.size_bytes / base.size_bytes - 1
    limit = t.max_size_growth
    status: Literal["ok", "improved", "regression"] = (
        "regression" if change > limit + _EPS else "improved" if -change > limit else "ok"
    )
    return [
        Delta(
            variant=cand.name,
            metric="size_mb",
            baseline=base.size_bytes / 1e6,
            candidate=cand.size_bytes / 1e6,
            change=change,
            limit=limit,
            status=status,
        )
    ]


def _check_deltas(base: Report, cand: Report) -> list[Delta]:
    """Each check the candidate failed, as a regression; the note says how the baseline fared."""
    before = {(c.source, c.variant, c.metric, c.shape): c for c in base.checks}
    deltas = []
    for check in cand.checks:
        if check:
            continue
        was = before.get((check.source, check.variant, check.metric, check.shape))
        fared = (
            "not checked in the baseline"
            if was is None
            else "failed in the baseline too"
            if not was
            else "passed in the baseline"
        )
        deltas.append(
            Delta(
                variant=check.variant,
                metric=f"{check.source}:{check.metric}",
                shape=check.shape,
                baseline=was.value if was is not None else None,
                candidate=check.value,
                change=None,
                limit=None,
                status="regression",
                note=f"the candidate's own check failed: {check}; {fared}",
            )
        )
    return deltas


def _unlike_warnings(base: Report, cand: Report) -> list[str]:
    """Differences that make the accuracy deltas compare unlike things."""
    warnings = []
    b_sha, c_sha = base.model.get("sha256"), cand.model.get("sha256")
    if b_sha and c_sha and b_sha != c_sha:
        warnings.append(
            f"different models: baseline {base.model.get('source')} ({b_sha[:12]}), candidate "
            f"{cand.model.get('source')} ({c_sha[:12]}); accuracy deltas compare other weights"
        )
    if base.task != cand.task:
        warnings.append(f"different tasks: baseline {base.task}, candidate {cand.task}")
    for name in ("evaluation", "calibration"):
        b, c = (base.inputs or {}).get(name), (cand.inputs or {}).get(name)
        if b and c and b != c:
            warnings.append(
                f"different {name} data: baseline {b[:12]}, candidate {c[:12]} (sha256); "
                + (
                    "accuracy is measured on other texts"
                    if name == "evaluation"
                    else "static INT8 ranges and outlier channels come from other texts"
                )
            )

    def samples(report: Report) -> list[int]:
        counts = {c.accuracy.get("samples") for c in report.contenders if c.accuracy}
        return sorted(n for n in counts if isinstance(n, int))

    b_n, c_n = samples(base), samples(cand)
    if b_n and c_n and b_n != c_n:
        warnings.append(
            f"different numbers of evaluation texts: baseline {', '.join(map(str, b_n))}, "
            f"candidate {', '.join(map(str, c_n))}"
        )
    b_pt = next((c.target for c in base.contenders if c.kind == "pytorch"), None)
    c_pt = next((c.target for c in cand.contenders if c.kind == "pytorch"), None)
    if b_pt and c_pt and b_pt != c_pt:
        warnings.append(
            f"PyTorch eager ran as {b_pt} in the baseline and {c_pt} in the candidate: "
            "speed-ups are read against different references"
        )
    return warnings


def _gpu_key(report: Report) -> tuple[bool, str | None, str | None]:
    gpu = report.gpu() or {}
    return report.ran_on_gpu(), gpu.get("name"), gpu.get("driver")


def _gpu_said(report: Report) -> str:
    if not report.ran_on_gpu():
        return "no GPU"
    return report.gpu_label() or "a GPU its manifest does not name"


def _environment_warnings(base: Report, cand: Report, t: Thresholds) -> list[str]:
    warnings = []
    b_cpu = base.environment.get("hardware", {}).get("cpu")
    c_cpu = cand.environment.get("hardware", {}).get("cpu")
    hint = "" if t.latency_basis == "speedup" else "; compare with --latency-basis speedup"
    # (With the speed-up basis these are notes: the ratio to PyTorch eager cancels them.)
    if b_cpu != c_cpu:
        warnings.append(f"different hardware: baseline on {b_cpu}, candidate on {c_cpu}{hint}")
    if _gpu_key(base) != _gpu_key(cand):
        warnings.append(
            f"different GPUs: baseline on {_gpu_said(base)}, candidate on {_gpu_said(cand)}{hint}"
        )
    if base.threads != cand.threads:
        warnings.append(
            f"different thread counts: baseline {base.threads}, candidate {cand.threads}"
        )
    b_pt = next((c for c in base.contenders if c.kind == "pytorch"), None)
    c_pt = next((c for c in cand.contenders if c.kind == "pytorch"), None)
    if b_pt and c_pt:
        for shape in [s for s in base.shapes if s in cand.shapes]:
            b, c = b_pt.latency.get(shape), c_pt.latency.get(shape)
            if b and c and abs(c.p50_ms / b.p50_ms - 1) > t.max_latency_regression:
                warnings.append(
                    f"PyTorch eager itself changed {c.p50_ms / b.p50_ms - 1:+.1%} at {shape}: "
                    f"the machine or its load differs{hint}"
                )
    return warnings


def compare(
    baseline: Report, candidate: Report, thresholds: Thresholds, checks: bool = True
) -> Comparison:
    """Every figure of every variant the two builds share, with its verdict; with ``checks``,
    each check the candidate failed (``tforge build --baseline`` leaves them out: the build's
    own report lists its checks, and they fail it already)."""
    warnings = _unlike_warnings(baseline, candidate)
    warnings += _environment_warnings(baseline, candidate, thresholds)
    deltas: list[Delta] = []
    cand_by_name = {c.name: c for c in candidate.contenders if c.kind == "variant"}
    base_names = [c.name for c in baseline.contenders if c.kind == "variant"]
    for base in baseline.contenders:
        if base.kind != "variant":
            continue
        cand = cand_by_name.get(base.name)
        if cand is None:
            deltas.append(_absent(base.name, "variant", "in the baseline, not in the candidate"))
            continue
        deltas += _accuracy_deltas(base, cand, thresholds)
        deltas += _latency_deltas(baseline, candidate, base.name, thresholds, warnings)
        deltas += _size_delta(base, cand, thresholds)
    for name in cand_by_name:
        if name not in base_names:
            deltas.append(_absent(name, "variant", "not in the baseline", status="new"))
    if checks:
        deltas += _check_deltas(baseline, candidate)
    return Comparison(
        baseline_run=baseline.run_id,
        candidate_run=candidate.run_id,
        thresholds=thresholds.model_dump(),
        deltas=deltas,
        passed=all(deltas),
        warnings=warnings,
    )


#: The figures of a latency delta (a check delta or a missing timing may carry a shape too).
_LATENCY_METRICS = ("p50_ms", "speedup")


def _is_latency_regression(d: Delta) -> bool:
    """A latency regression a re-measurement could clear: not a missing timing (no timing will
    bring a shape back) and not a failed check of the candidate's own (its report stands)."""
    return d.status == "regression" and d.metric in _LATENCY_METRICS and d.shape is not None


def _latency_regressions(comparison: Comparison) -> list[Delta]:
    return [d for d in comparison.deltas if _is_latency_regression(d)]


def confirm_latency(
    baseline: Report,
    candidate: Report,
    thresholds: Thresholds,
    remeasure: Callable[[], Report],
    times: int,
    checks: bool = True,
) -> tuple[Comparison, Report]:
    """Compare; while latency regressions remain, re-measure the candidate (up to ``times``).

    Returns the comparison and the candidate as last measured. A latency regression stands only
    if every measurement showed it; one that any measurement did not reproduce is reported as
    ``noise``. Accuracy and size are not re-measured (deterministic for a given build).
    ``checks`` as in :func:`compare`.
    """
    comparison = compare(baseline, candidate, thresholds, checks)
    suspects = {(d.variant, d.metric, d.shape) for d in _latency_regressions(comparison)}
    runs = 0
    while suspects and runs < times:
        runs += 1
        candidate = remeasure()
        comparison = compare(baseline, candidate, thresholds, checks)
        suspects &= {(d.variant, d.metric, d.shape) for d in _latency_regressions(comparison)}
    if runs == 0:
        return comparison, candidate
    deltas = []
    for d in comparison.deltas:
        if not _is_latency_regression(d):
            deltas.append(d)
        elif (d.variant, d.metric, d.shape) in suspects:
            deltas.append(d.model_copy(update={"note": f"in all {runs + 1} measurements"}))
        else:
            note = f"not in every one of {runs + 1} measurements"
            deltas.append(d.model_copy(update={"status": "noise", "note": note}))
    confirmed = comparison.model_copy(
        update={"deltas": deltas, "passed": all(deltas), "remeasured": runs}
    )
    return confirmed, candidate
