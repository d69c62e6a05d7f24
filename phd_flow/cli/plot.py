"""The ``plot`` command and ``compare --plot``: metric curves and sweep results as PNG files.

matplotlib (installed with mlflow) is imported here only, on its Agg backend: no display, no
window, works over ssh and on SLURM nodes.

* ``plot KEY... --metric loss [--x step|time] -o curves.png``: one curve per run;
* ``plot --sweep S --metric acc --x lr``: the metric's last value against an arg, one point per
  run, the best marked (lower is better for loss-like names, see
  :func:`phd_flow.runs.metrics.lower_is_better`; ``--minimize``/``--maximize`` override).

The figure functions return the matplotlib Figure (tests count its lines and points).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow.errors import ArgsError, UserError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from phd_flow.project import Project
    from phd_flow.runs.query import Run

#: A curve: label, x values, y values.
Curve = tuple[str, list[float], list[float]]
TIME_AXES = ("step", "time")


def register_plot(commands: Any) -> None:
    from phd_flow.cli.selection import add_direction

    parser = commands.add_parser(
        "plot",
        help="draw metrics as a PNG: curves of runs, or a metric against a swept arg",
        description="Draw a PNG, offline. With --x step (default) or time: one curve of METRIC per run. "
        "With --x ARG: the last value of METRIC against the arg ARG, one point per run, the best marked "
        "(lower is better for names with loss/err/mse/mae/nll/time/cost..., else higher; "
        "--minimize/--maximize override).",
    )
    parser.add_argument("keys", nargs="*", metavar="KEY", help="run keys or unique prefixes")
    parser.add_argument("--sweep", metavar="KEY", help="the points of the sweep KEY (key, prefix or suffix)")
    parser.add_argument(
        "--where", action="append", default=[], metavar="FIELD OP VALUE", help="only runs where this holds (as in ls)"
    )
    parser.add_argument("--metric", required=True, metavar="NAME", help="the metric to draw")
    parser.add_argument("--x", default="step", metavar="AXIS", help="step (default), time (seconds), or an arg name")
    parser.add_argument("-o", "--output", metavar="PNG", help="the file to write (default: METRIC_vs_AXIS.png)")
    add_direction(parser)
    parser.set_defaults(func=_cmd_plot)


def _cmd_plot(project: Project, args: argparse.Namespace) -> int:
    from phd_flow.cli.selection import compared_runs

    metric = args.metric.removeprefix("metrics.")
    output = args.output or f"{_file_part(metric)}_vs_{_file_part(args.x)}.png"
    if not output.lower().endswith(".png"):
        raise ArgsError(f"-o {output}: plots are PNG files; give a name ending in .png.")
    runs = compared_runs(project, args.keys, args.where, args.sweep)
    if args.x in TIME_AXES:
        figure = curves_figure(project, runs, metric, args.x)
    else:
        figure = sweep_figure(runs, metric, args.x, _lower(metric, args))
    save(figure, output)
    return 0


def _lower(metric: str, args: argparse.Namespace) -> bool:
    from phd_flow.runs.metrics import lower_is_better

    return lower_is_better(metric, args.minimize, args.maximize)


def _file_part(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def save(figure: Figure, output: str) -> None:
    """Write ``figure`` as a PNG and say where."""
    path = Path(output)
    try:
        figure.savefig(path, format="png", dpi=110)
    except OSError as exc:
        raise UserError(f"Could not write {path}: {exc.strerror or exc}. Give another path with -o.") from None
    finally:
        _pyplot().close(figure)
    print(f"Wrote {path}")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


# --- figures ------------------------------------------------------------------------------------


def curves(project: Project, runs: Sequence[Run], metric: str, x: str = "step") -> list[Curve]:
    """One curve of ``metric`` per run that logged it (x: step, or seconds since its first
    point), labelled by the args that differ between the runs."""
    from phd_flow.cli.render import args_summary
    from phd_flow.run.record import METRICS_FILE
    from phd_flow.runs.metrics import parse_points
    from phd_flow.runs.query import read_run_file

    labels = _labels(runs, args_summary(list(runs), limit=3, width=40))
    found: list[Curve] = []
    for run, label in zip(runs, labels, strict=True):
        points = [p for p in parse_points(read_run_file(project, run, METRICS_FILE) or b"") if p[0] == metric]
        if not points:
            continue
        if x == "time":
            start = min(p[3] for p in points)
            pairs = sorted(((p[3] - start) / 1000, p[1]) for p in points)
        else:
            pairs = [(float(step), value) for _, value, step, _ in sorted(points, key=lambda p: p[2])]
        found.append((label, [a for a, _ in pairs], [b for _, b in pairs]))
    return found


def curves_figure(project: Project, runs: Sequence[Run], metric: str, x: str = "step") -> Figure:
    """``metric`` against step or time: one line per run that logged it."""
    drawn = curves(project, runs, metric, x)
    if not drawn:
        raise UserError(_no_metric(runs, metric))
    figure: Figure
    figure, axes = _pyplot().subplots(figsize=(8, 5))
    _draw_curves(axes, drawn)
    axes.set_xlabel("time (s since the first point)" if x == "time" else "step")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} of {len(drawn)} run{'s' if len(drawn) != 1 else ''}")
    figure.tight_layout()
    return figure


def compare_figure(project: Project, runs: Sequence[Run], metrics: Sequence[str]) -> Figure:
    """One panel per metric, one line per run (``compare --plot``)."""
    if not metrics:
        raise UserError("The runs logged no metric: there is nothing to plot.")
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure: Figure
    figure, grid = _pyplot().subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for index, axes in enumerate(grid.flat):
        if index >= len(metrics):
            axes.set_visible(False)
            continue
        drawn = curves(project, runs, metrics[index])
        axes.set_title(metrics[index])
        if all(len(xs) == 1 for _, xs, _ in drawn):  # one value per run: bars, not dots on a line
            bars = axes.bar(range(len(drawn)), [ys[0] for _, _, ys in drawn], color="tab:blue")
            axes.set_xticks(range(len(drawn)), [label for label, _, _ in drawn], rotation=20, fontsize="small")
            axes.bar_label(bars, fmt="%.4g", fontsize="small")
            continue
        _draw_curves(axes, drawn)
        axes.set_xlabel("step")
    figure.tight_layout()
    return figure


def sweep_figure(runs: Sequence[Run], metric: str, x: str, lower: bool) -> Figure:
    """The last value of ``metric`` against arg ``x``: one point per run that has both, the
    best one marked with a star and its key suffix."""
    from phd_flow.runs.metrics import as_number, best_index
    from phd_flow.runs.where import field_value, is_missing, text

    arg = x.removeprefix("args.")
    points: list[tuple[Any, float, Run]] = []
    for run in runs:
        value = as_number((run.metrics.get(metric) or {}).get("last"))
        position = field_value(run, f"args.{arg}")
        if value is not None and not is_missing(position):
            points.append((position, value, run))
    if not points:
        raise UserError(_no_metric(runs, metric) + f" (and the arg {arg!r})")
    numeric = all(as_number(p[0]) is not None and not isinstance(p[0], str) for p in points)
    if numeric:
        xs = [float(p[0]) for p in points]
        ticks: list[str] = []
    else:
        ticks = sorted({text(p[0]) for p in points})
        xs = [float(ticks.index(text(p[0]))) for p in points]
    ys = [p[1] for p in points]
    figure: Figure
    figure, axes = _pyplot().subplots(figsize=(8, 5))
    axes.scatter(xs, ys, s=36, color="tab:blue", label=f"{len(points)} runs", zorder=2)
    best = best_index(ys, lower)
    if best is not None:
        key = points[best][2].key
        axes.scatter(
            [xs[best]],
            [ys[best]],
            s=260,
            marker="*",
            color="tab:red",
            zorder=3,
            label=f"best ({'lowest' if lower else 'highest'}): {arg}={text(points[best][0])}, "
            f"{metric}={ys[best]:.4g}  [{key.rsplit('_', 1)[-1]}]",
        )
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 100:
        axes.set_xscale("log")
    if ticks:
        axes.set_xticks(range(len(ticks)), ticks)
    elif all(isinstance(p[0], int) for p in points):  # seeds, epochs, layers: no 2.2 ticks
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(arg)
    axes.set_ylabel(f"{metric} (last value)")
    axes.set_title(f"{metric} against {arg}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _draw_curves(axes: Axes, drawn: list[Curve]) -> None:
    for label, xs, ys in drawn:
        axes.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    axes.grid(True, alpha=0.3)
    if drawn and len(drawn) <= 20:
        axes.legend(fontsize="small")


def _labels(runs: Sequence[Run], summaries: list[str]) -> list[str]:
    """The args that differ; the key's suffix where they do not tell runs apart."""
    counts = {s: summaries.count(s) for s in summaries}
    labels = []
    for run, summary in zip(runs, summaries, strict=True):
        suffix = run.key.rsplit("_", 1)[-1]
        labels.append(summary if summary and counts[summary] == 1 and len(runs) > 1 else f"{suffix} {summary}".strip())
    return labels


def _no_metric(runs: Sequence[Run], metric: str) -> str:
    logged = sorted({name for run in runs for name in run.metrics})
    return f"None of the {len(runs)} run(s) logged the metric {metric!r}" + (
        f"; they logged: {', '.join(logged)}." if logged else "; they logged no metric."
    )
