"""The ``tforge`` command: a thin click layer over the library; the only module that prints or exits.

Exit codes: 0 ok, 1 error, 2 usage (bad options or recipe), 3 a check or gate failed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from pipeline import __version__
from pipeline.artifacts import StageRecord, write_text_atomic
from pipeline.errors import GateFailed, TforgeError, read_text
from pipeline.recipe import TASKS

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_GATE = 0, 1, 2, 3
# Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns; give them room instead.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    # Libraries are loud at INFO; keep them at WARNING unless -vv.
    for name in (
        "torch",
        "onnxscript",
        "onnx_ir",
        "transformers",
        "urllib3",
        "filelock",
        "httpx",
        "huggingface_hub",
    ):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def common_options(func: F) -> F:
    @click.option(
        "-q",
        "--quiet",
        is_flag=True,
        help="For CI logs: no progress bars or info logs; build and compare end in one result line (inspect and doctor still print what they are asked for).",
    )
    @click.option("-v", "--verbose", count=True, help="Debug logs (-vv: libraries too).")
    @functools.wraps(func)
    def wrapper(*args: Any, quiet: bool, verbose: int, **kwargs: Any) -> Any:
        _setup_logging(verbose, quiet)
        try:
            return func(*args, quiet=quiet, verbose=verbose, **kwargs)
        except TforgeError as error:
            label = "failed" if isinstance(error, GateFailed) else "error"
            err.print(
                f"{label}: {error.message}",
                markup=False,
                style="bold red" if err.is_terminal else None,
            )
            if error.hint:
                err.print(f"  hint: {error.hint}", markup=False)
            if verbose and error.__cause__ is not None:
                err.print_exception()
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def threshold_options(func: F) -> F:
    """The thresholds of a comparison with a baseline (``tforge compare``, ``build --baseline``)."""
    options = [
        click.option(
            "--max-cosine-drop",
            type=click.FloatRange(min=0),
            default=0.001,
            show_default=True,
            help="Largest drop of a variant's mean cosine vs PyTorch (absolute).",
        ),
        click.option(
            "--max-worst-cosine-drop",
            type=click.FloatRange(min=0),
            default=0.01,
            show_default=True,
            help="Largest drop of the worst cosine (absolute).",
        ),
        click.option(
            "--max-agreement-drop",
            type=click.FloatRange(min=0),
            default=0.01,
            show_default=True,
            help="Largest drop of the agreement with PyTorch (absolute).",
        ),
        click.option(
            "--max-task-drop",
            type=click.FloatRange(min=0),
            default=0.01,
            show_default=True,
            help="Largest drop of the task metric (absolute).",
        ),
        click.option(
            "--max-token-match-drop",
            type=click.FloatRange(min=0),
            default=0.01,
            show_default=True,
            help="Decoders: largest drop of the greedy token match with PyTorch (absolute).",
        ),
        click.option(
            "--max-perplexity-increase",
            type=click.FloatRange(min=0),
            default=0.01,
            show_default=True,
            help="Decoders: largest growth of the perplexity increase over PyTorch "
            "(absolute: 0.01 = one percentage point).",
        ),
        click.option(
            "--max-latency-regression",
            type=click.FloatRange(min=0),
            default=10.0,
            show_default=True,
            metavar="PERCENT",
            help="Largest latency increase, in percent.",
        ),
        click.option(
            "--max-size-growth",
            type=click.FloatRange(min=0),
            default=5.0,
            show_default=True,
            metavar="PERCENT",
            help="Largest size increase, in percent.",
        ),
        click.option(
            "--latency-basis",
            type=click.Choice(["p50", "speedup"]),
            default="speedup",
            show_default=True,
            help="Compare speed-ups over PyTorch eager timed in the same build (robust to a "
            "slower or busier machine), or the variants' own medians.",
        ),
        click.option(
            "--noise-sigmas",
            type=click.FloatRange(min=0),
            default=3.0,
            show_default=True,
            help="Width of the latency noise band in standard errors of the medians.",
        ),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.report.compare import Thresholds

        try:
            kwargs["thresholds"] = Thresholds(
                max_cosine_drop=kwargs.pop("max_cosine_drop"),
                max_worst_cosine_drop=kwargs.pop("max_worst_cosine_drop"),
                max_agreement_drop=kwargs.pop("max_agreement_drop"),
                max_task_metric_drop=kwargs.pop("max_task_drop"),
                max_token_match_drop=kwargs.pop("max_token_match_drop"),
                max_perplexity_increase=kwargs.pop("max_perplexity_increase"),
                max_latency_regression=kwargs.pop("max_latency_regression") / 100,
                max_size_growth=kwargs.pop("max_size_growth") / 100,
                latency_basis=kwargs.pop("latency_basis"),
                noise_sigmas=kwargs.pop("noise_sigmas"),
            )
        except ValueError as error:
            raise click.UsageError(f"thresholds: {error}") from None
        return func(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


class RichProgress:
    """Progress bars on a terminal: one for the build's steps, one for the current inner task."""

    def __init__(self, console: Console) -> None:
        self.bars = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.steps: Any = None

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def step_started(self, index: int, total: int, step: str) -> None:
        if self.steps is None:
            self.steps = self.bars.add_task("build", total=total)
        self.bars.update(self.steps, description=f"[bold]{step}[/]", completed=index)

    def step_finished(self, record: StageRecord) -> None:
        state = "[dim]cached[/]" if record.cached else f"{record.seconds:.1f}s"
        self.bars.console.print(f"  {record.step:<16} {state}", highlight=False)
        self.bars.advance(self.steps)

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        task = self.bars.add_task(f"  {description}", total=total)

        def advance(n: int = 1) -> None:
            self.bars.advance(task, n)

        try:
            yield advance
        finally:
            self.bars.remove_task(task)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tforge")
def cli() -> None:
    """tforge: compile, quantize and verify trained Transformers."""


def _print_summary(outcome: Any) -> None:
    from pipeline.report.markdown import accuracy_cells, accuracy_columns

    report = outcome.report
    table = Table(title=f"{report.recipe_name}: {report.task}", title_justify="left")
    table.add_column("contender")
    for header, _, _ in accuracy_columns(report):
        table.add_column(header, justify="right")
    for shape in report.shapes:
        table.add_column(f"{shape} p50 ms", justify="right")
        table.add_column("speed-up", justify="right")
    table.add_column("size MB", justify="right")
    for c in report.contenders:
        row = [escape(c.name), *accuracy_cells(report, c)]
        for shape in report.shapes:
            lat = c.latency.get(shape)
            row += (
                [f"{lat.p50_ms:.2f}", "1.00x" if lat.speedup is None else f"{lat.speedup:.2f}x"]
                if lat
                else ["–", "–"]
            )
        row.append(f"{c.size_bytes / 1e6:.1f}" if c.size_bytes else "–")
        table.add_row(*row)
    out.print(table)
    for check in report.checks:
        if not check.passed:
            out.print(f"[red]FAILED[/] {check.source}: {escape(str(check))}", highlight=False)


def _delta_line(delta: Any) -> str:
    from pipeline.report.junit import delta_text

    return delta_text(delta)


def _print_comparison(comparison: Any, quiet: bool) -> None:
    for warning in comparison.warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False)
    regressions = comparison.regressions
    if not quiet or regressions:
        verdict = "no regression" if comparison.passed else f"{len(regressions)} regression(s)"
        out.print(
            f"against baseline {comparison.baseline_run}: {verdict}", markup=False, highlight=False
        )
    for delta in regressions:
        out.print(f"REGRESSION {_delta_line(delta)}", markup=False, highlight=False)


@cli.command()
@click.argument("recipe", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.option(
    "--model",
    "model_source",
    metavar="PATH",
    help="Checkpoint folder (or package:<name>); overrides the recipe's model.",
)
@click.option(
    "--task",
    type=click.Choice(list(TASKS)),
    help="Task; overrides the recipe's.",
)
@click.option(
    "--artifacts",
    type=click.Path(path_type=Path),
    default=Path("artifacts"),
    show_default=True,
    envvar="TFORGE_ARTIFACTS",
    help="Output root: cache/ and runs/.",
)
@click.option("--run-id", help="Name of the run folder (default: time and recipe name).")
@click.option("--no-cache", is_flag=True, help="Re-run every stage.")
@click.option("--remeasure", is_flag=True, help="Re-run the latency stage only.")
@click.option("--dry-run", is_flag=True, help="Print the plan (and what is cached) and exit.")
@click.option("--print-recipe", is_flag=True, help="Print the resolved recipe as YAML and exit.")
@click.option(
    "--baseline",
    type=click.Path(exists=True, path_type=Path),
    help="Compare with this build (run folder, manifest.json or report.json); exit 3 on a regression.",
)
@click.option(
    "--confirm",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="With --baseline: re-measure latency up to N times before declaring a latency regression.",
)
@click.option(
    "--skip-unavailable",
    is_flag=True,
    help="Leave out the variants this machine cannot build (see tforge doctor), saying why, "
    "instead of refusing the build.",
)
@threshold_options
@common_options
def build(
    recipe: Path | None,
    model_source: str | None,
    task: str | None,
    artifacts: Path,
    run_id: str | None,
    no_cache: bool,
    remeasure: bool,
    dry_run: bool,
    print_recipe: bool,
    baseline: Path | None,
    confirm: int,
    skip_unavailable: bool,
    thresholds: Any,
    quiet: bool,
    verbose: int,
) -> None:
    """Build RECIPE (a YAML file), or --model PATH with defaults: load, export, verify, time, report."""
    from pipeline.build import BuildOptions, describe_plan
    from pipeline.build import build as run_build
    from pipeline.recipe import default_recipe, dump_recipe, load_recipe

    if recipe is None and model_source is None:
        raise click.UsageError(
            "give a RECIPE file or --model PATH (e.g. tforge build models/minilm.yaml)"
        )
    resolved = (
        load_recipe(recipe).with_model(model_source, task)
        if recipe
        else default_recipe(model_source, task)
    )
    if print_recipe and dry_run:
        raise click.UsageError("--print-recipe and --dry-run each print and exit: pass one")
    if print_recipe:
        out.print(dump_recipe(resolved), markup=False, end="")
        return
    if dry_run:
        if skip_unavailable:
            from pipeline.targets import buildable

            resolved, skipped = buildable(resolved)
            for name, why in skipped.items():
                err.print(f"would skip variant {name}: {why}", markup=False, highlight=False)
        resolved.require_one_device()
        rows = describe_plan(resolved, artifacts, no_cache=no_cache, remeasure=remeasure)
        table = Table(title=f"plan for {resolved.name}", title_justify="left")
        for column in ("step", "does", "inputs", "status"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                escape(row.step),
                escape(row.stage),
                escape(", ".join(row.inputs.values())),
                row.status,
            )
        out.print(table)
        return
    from pipeline.report.model import load_report

    options = BuildOptions(
        artifacts=artifacts,
        no_cache=no_cache,
        remeasure=remeasure,
        run_id=run_id,
        baseline=load_report(baseline)[0] if baseline else None,
        thresholds=thresholds,
        confirm=confirm,
        skip_unavailable=skip_unavailable,
    )
    if not quiet and err.is_terminal:
        with RichProgress(err) as progress:
            outcome = run_build(resolved, options, progress)
    else:
        outcome = run_build(resolved, options)
    if not quiet:
        _print_summary(outcome)
    comparison = outcome.report.comparison
    if comparison is not None:
        _print_comparison(comparison, quiet)
    cached = outcome.report.cached_steps
    state = "passed" if outcome.passed else "FAILED"
    out.print(
        f"{state}: report {outcome.run_dir / 'report.md'} ({cached} of {len(outcome.report.stages)} steps from cache)",
        markup=False,
        highlight=False,
    )
    if not outcome.passed:
        failed = outcome.manifest.failed_checks
        if failed:
            raise GateFailed(f"{len(failed)} check(s) failed, first: {failed[0]}")
        regressions = comparison.regressions if comparison else []
        raise GateFailed(
            f"{len(regressions)} regression(s) against the baseline, first: {_delta_line(regressions[0])}"
        )


def _manifest_path(path: Path) -> Path:
    return path / "manifest.json" if path.is_dir() else path


@cli.command()
@click.argument("run", required=False, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["markdown", "json", "html", "junit", "none"]),
    default="markdown",
    show_default=True,
    help="What to print.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Folder to write report.json, report.md, report.html and junit.xml into (default: the run folder).",
)
@click.option("--schema", is_flag=True, help="Print the JSON Schema of report.json and exit.")
@common_options
def report(
    run: Path | None, fmt: str, output: Path | None, schema: bool, quiet: bool, verbose: int
) -> None:
    """Re-render the reports of RUN (a run folder or its manifest.json) in every format."""
    from pipeline.errors import InputError
    from pipeline.manifest import Manifest
    from pipeline.report import FILES, build_report, render_all
    from pipeline.report.model import json_schema

    if schema:
        click.echo(json.dumps(json_schema(), indent=2))
        return
    if run is None:
        raise click.UsageError("pass RUN (a run folder or its manifest.json), or --schema")
    path = _manifest_path(run)
    if not path.is_file():
        raise InputError(f"{run} has no manifest.json", "pass a run folder under artifacts/runs/")
    text = read_text(path, "a tforge manifest", "pass a run folder under artifacts/runs/")
    manifest = Manifest.parse(text, str(path))
    rendered = render_all(build_report(manifest))
    target = output or path.parent
    try:
        for name, text in rendered.items():
            write_text_atomic(target / name, text)
    except OSError as error:
        raise InputError(
            f"cannot write the reports into {target} ({error.strerror or error})",
            "pass --output DIR",
        ) from None
    if not quiet and fmt != "none":
        click.echo(rendered[FILES[fmt]], nl=False)


@cli.command()
@click.argument("baseline", type=click.Path(exists=True, path_type=Path))
@click.argument("candidate", type=click.Path(exists=True, path_type=Path))
@threshold_options
@click.option(
    "--remeasure",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="On a latency regression, re-measure CANDIDATE (a run folder) up to N times; "
    "a regression stands only if every measurement shows it. Each re-measurement is a build "
    "in the artifacts folder that holds CANDIDATE (its cache serves every step but latency) "
    "and writes a new run folder there.",
)
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(path_type=Path),
    help="Write the Markdown diff here.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    help="Write the comparison as JSON here.",
)
@click.option(
    "--junit", "junit_path", type=click.Path(path_type=Path), help="Write JUnit XML here."
)
@common_options
def compare(
    baseline: Path,
    candidate: Path,
    thresholds: Any,
    remeasure: int,
    markdown_path: Path | None,
    json_path: Path | None,
    junit_path: Path | None,
    quiet: bool,
    verbose: int,
) -> None:
    """Compare CANDIDATE with BASELINE (run folders, manifest.json or report.json files).

    Exit 3 when an accuracy figure dropped, a latency grew or a size grew beyond its threshold,
    or a variant is missing.
    """
    from pipeline.build import BuildOptions
    from pipeline.build import build as run_build
    from pipeline.errors import InputError
    from pipeline.recipe import parse_recipe
    from pipeline.report.compare import confirm_latency
    from pipeline.report.junit import render_junit
    from pipeline.report.markdown import render_comparison
    from pipeline.report.model import load_report

    base, _ = load_report(baseline)
    cand, manifest_path = load_report(candidate)
    if remeasure and manifest_path is None:
        raise InputError(
            f"--remeasure needs CANDIDATE to be a run folder, not {candidate}",
            "pass the candidate's run folder (artifacts/runs/<run-id>)",
        )

    def measure_again() -> Any:
        from pipeline.manifest import Manifest

        assert manifest_path is not None
        manifest = Manifest.parse(manifest_path.read_text(encoding="utf-8"), str(manifest_path))
        recipe = parse_recipe(manifest.recipe, str(manifest_path))
        artifacts = manifest_path.parent.parent.parent
        if not quiet:
            err.print("re-measuring the candidate's latency", markup=False)
        return run_build(recipe, BuildOptions(artifacts=artifacts, remeasure=True)).report

    comparison, _ = confirm_latency(base, cand, thresholds, measure_again, remeasure)
    markdown = render_comparison(comparison)
    try:
        if markdown_path:
            write_text_atomic(markdown_path, markdown)
        if json_path:
            write_text_atomic(json_path, comparison.model_dump_json(indent=2) + "\n")
        if junit_path:
            write_text_atomic(junit_path, render_junit(cand, comparison, include_checks=False))
    except OSError as error:
        raise InputError(f"cannot write the comparison ({error.strerror or error})") from None
    if not quiet:
        click.echo(markdown, nl=False)
    else:
        # CI: the verdict in one line (and each regression), as `build --quiet` ends.
        _print_comparison(comparison, quiet=False)
    if not comparison.passed:
        regressions = comparison.regressions
        raise GateFailed(
            f"{len(regressions)} regression(s) against {baseline}, first: {_delta_line(regressions[0])}"
        )


@cli.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@common_options
def inspect(model: Path, as_json: bool, quiet: bool, verbose: int) -> None:
    """Summarise an ONNX file (or a folder holding model.onnx): ops, opset, size, inputs, outputs."""
    from pipeline.inspect import inspect_onnx

    info = inspect_onnx(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    out.print(
        f"[bold]{escape(info['path'])}[/]  {info['size_bytes'] / 1e6:.2f} MB  ir {info['ir_version']}  producer {info['producer']}"
    )
    out.print("opsets: " + ", ".join(f"{d} {v}" for d, v in info["opset"].items()), highlight=False)
    out.print(
        f"parameters: {info['parameters']:,} in {info['initializers']} initializers; {info['nodes']} nodes",
        highlight=False,
    )
    io = Table(title="inputs and outputs", title_justify="left")
    for column in ("", "name", "type", "shape"):
        io.add_column(column)
    for kind in ("inputs", "outputs"):
        for item in info[kind]:
            io.add_row(kind[:-1], escape(item["name"]), item["type"], escape(str(item["shape"])))
    out.print(io)
    ops = Table(title="operators", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info["ops"].items():
        ops.add_row(escape(op), str(count))
    out.print(ops)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@common_options
def doctor(as_json: bool, quiet: bool, verbose: int) -> None:
    """Which targets this machine can build and run, and the versions behind them."""
    from pipeline.doctor import diagnose

    findings = diagnose()
    if as_json:
        click.echo(json.dumps(findings, indent=2))
        return
    table = Table(title="targets", title_justify="left")
    for column in ("target", "available", "detail"):
        table.add_column(column)
    for target in findings["targets"]:
        table.add_row(
            target["name"],
            "[green]yes[/]" if target["available"] else "[red]no[/]",
            escape(target["detail"]),
        )
    out.print(table)
    hw = findings["hardware"]
    out.print(
        f"CPU: {hw['cpu']} ({hw['physical_cores']} cores, flags: {', '.join(hw['cpu_flags']) or 'none'})",
        highlight=False,
    )
    out.print(
        "versions: " + ", ".join(f"{k} {v}" for k, v in findings["versions"].items()),
        highlight=False,
    )


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
