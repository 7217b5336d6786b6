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
from pipeline.errors import GateFailed, TforgeError

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
    @click.option("-q", "--quiet", is_flag=True, help="No progress and no tables: for CI logs.")
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
    from pipeline.report.markdown import figure

    report = outcome.report
    table = Table(title=f"{report.recipe_name}: {report.task}", title_justify="left")
    table.add_column("contender")
    table.add_column("max abs err", justify="right")
    table.add_column("mean cos", justify="right")
    table.add_column("agreement", justify="right")
    for shape in report.shapes:
        table.add_column(f"{shape} p50 ms", justify="right")
        table.add_column("speed-up", justify="right")
    table.add_column("size MB", justify="right")
    for c in report.contenders:
        acc = c.accuracy
        row = [
            escape(c.name),
            "ref" if acc is None else figure(acc.get("max_abs_error"), ".2e"),
            "–" if acc is None else figure(acc.get("mean_cosine"), ".6f"),
            "–" if acc is None else figure(acc.get("agreement"), ".3f"),
        ]
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
    type=click.Choice(["feature-extraction", "sequence-classification", "token-classification"]),
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
    if print_recipe:
        out.print(dump_recipe(resolved), markup=False, end="")
        return
    if dry_run:
        rows = describe_plan(resolved, artifacts)
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
    options = BuildOptions(
        artifacts=artifacts, no_cache=no_cache, remeasure=remeasure, run_id=run_id
    )
    if not quiet and err.is_terminal:
        with RichProgress(err) as progress:
            outcome = run_build(resolved, options, progress)
    else:
        outcome = run_build(resolved, options)
    if not quiet:
        _print_summary(outcome)
    cached = outcome.report.cached_steps
    state = "passed" if outcome.passed else "FAILED"
    out.print(
        f"{state}: report {outcome.run_dir / 'report.md'} ({cached} of {len(outcome.report.stages)} steps from cache)",
        markup=False,
        highlight=False,
    )
    if not outcome.passed:
        failed = outcome.manifest.failed_checks
        raise GateFailed(f"{len(failed)} check(s) failed, first: {failed[0]}")


def _manifest_path(path: Path) -> Path:
    return path / "manifest.json" if path.is_dir() else path


@cli.command()
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["markdown", "json", "none"]),
    default="markdown",
    show_default=True,
    help="What to print.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Folder to write report.json and report.md into (default: the run folder).",
)
@common_options
def report(run: Path, fmt: str, output: Path | None, quiet: bool, verbose: int) -> None:
    """Re-render the reports of RUN (a run folder or its manifest.json)."""
    from pipeline.errors import InputError
    from pipeline.manifest import Manifest
    from pipeline.report import build_report, render_json, render_markdown

    path = _manifest_path(run)
    if not path.is_file():
        raise InputError(f"{run} has no manifest.json", "pass a run folder under artifacts/runs/")
    manifest = Manifest.parse(path.read_text(encoding="utf-8"), str(path))
    rendered = build_report(manifest)
    target = output or path.parent
    try:
        write_text_atomic(target / "report.json", render_json(rendered))
        write_text_atomic(target / "report.md", render_markdown(rendered))
    except OSError as error:
        raise InputError(
            f"cannot write the reports into {target} ({error.strerror or error})",
            "pass --output DIR",
        ) from None
    if not quiet and fmt != "none":
        click.echo(
            render_markdown(rendered) if fmt == "markdown" else render_json(rendered), nl=False
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
