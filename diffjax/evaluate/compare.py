"""Several runs side by side: a table, overlaid loss curves and needle accuracy bars (DIFF vs Transformer)."""

from typing import Any

import numpy as np
from etils import epath

from diffjax.cli import UsageError
from diffjax.evaluate import plots
from diffjax.evaluate.results import format_table, latest_results, write_json
from diffjax.files import absolute, staged
from diffjax.train.metrics import read_curve

CURVES = "loss_curves.png"
BARS = "needle_accuracy.png"


def _run_names(runs: list[epath.Path]) -> list[str]:
    """Directory names, or whole paths where two runs share a name."""
    names = [absolute(run).name for run in runs]
    return names if len(set(names)) == len(names) else [str(run) for run in runs]


def compare(runs: list[epath.Path], out: epath.Path | None = None) -> epath.Path:
    """Write `compare.json` and the figures for `runs` (each evaluated before) to `out`; returns `out`."""
    if len(runs) < 2:
        raise UsageError(f"--runs names {len(runs)} run; compare needs two or more, comma-separated")
    for run in runs:
        if not run.is_dir():
            raise UsageError(f"run directory {run} does not exist")
    names = _run_names(runs)
    evaluated = {name: latest_results(run) for name, run in zip(names, runs, strict=True)}
    out = out or runs[0] / "eval" / "compare"
    with staged(out, keep_existing=False) as scratch:
        figures = {"curves": _plot_curves(dict(zip(names, runs, strict=True)), scratch / CURVES)}
        bars = _plot_needles(evaluated, scratch / BARS)
        if bars:
            figures["needle_accuracy"] = bars
        rows = {name: _row(step, results) for name, (step, results) in evaluated.items()}
        write_json(scratch / "compare.json", {"runs": {n: str(r) for n, r in zip(names, runs, strict=True)},
                                              "table": rows, "figures": figures})  # fmt: skip
    columns = sorted({key for row in rows.values() for key in row}, key=_column_order)
    print(format_table(["run", *columns], [[name, *(row.get(c, "-") for c in columns)] for name, row in rows.items()]))
    print(f"wrote {out}")
    return out


def _row(step: int, results: dict[str, Any]) -> dict[str, str]:
    tasks, model = results.get("tasks", {}), results.get("model", {})
    row = {"attention": model.get("attention_type", "?"), "params": f"{model.get('parameters', 0) / 1e6:.2f}M"}
    row["step"] = str(step)
    if "perplexity" in tasks:
        row["loss"] = f"{tasks['perplexity']['loss']:.4f}"
        row["ppl"] = f"{tasks['perplexity']['perplexity']:.3f}"
    if "needles" in tasks:
        row |= {f"needles {k}": f"{v:.2f}" for k, v in tasks["needles"]["accuracy_by_counts"].items()}
    if "attention" in tasks:
        row["answer share"] = f"{tasks['attention']['answer']:.3f}"
        row["noise share"] = f"{tasks['attention']['noise']:.3f}"
    if "outliers" in tasks:
        row["logit top-1"] = f"{tasks['outliers']['attention_logits']['top-1']:.1f}"
        row["hidden top-1"] = f"{tasks['outliers']['hidden_states']['top-1']:.1f}"
    for task, metrics in tasks.get("harness", {}).get("tasks", {}).items():
        row |= {f"{task} {name}": f"{value:.4f}" for name, value in metrics.items() if _is_score(name, value)}
    if tasks.get("lambda", {}).get("applies"):
        row["mean lambda"] = f"{np.mean(tasks['lambda']['lambda']):.3f}"
    return row


def _is_score(name: str, value: float | None) -> bool:
    """A harness metric worth a column: computed, and not a standard error."""
    return value is not None and not name.endswith("_stderr")


def _column_order(column: str) -> tuple[int, str]:
    fixed = ["attention", "params", "step", "loss", "ppl"]
    return (fixed.index(column), "") if column in fixed else (len(fixed), column)


def _plot_curves(runs: dict[str, epath.Path], path: epath.Path) -> str:
    figure = plots.new_figure(8, 5)
    axes = figure.add_subplot()
    for color, (name, run) in enumerate(runs.items()):
        steps, loss = read_curve(run / "metrics.jsonl", "loss")
        axes.plot(steps, loss, color=f"C{color}", alpha=0.8, label=f"{name} train")
        steps, loss = read_curve(run / "eval.jsonl", "eval_loss")
        axes.plot(steps, loss, color=f"C{color}", linestyle="--", marker="o", label=f"{name} validation")
    axes.set_xlabel("training step")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title("Training and validation loss")
    axes.grid(alpha=0.3)
    axes.legend()
    return plots.save(figure, path)


def _plot_needles(evaluated: dict[str, tuple[int, dict]], path: epath.Path) -> str | None:
    """Grouped bars of accuracy per (N, R), one bar per run; None when no run has needle results."""
    accuracies = {
        name: results["tasks"]["needles"]["accuracy_by_counts"]
        for name, (_, results) in evaluated.items()
        if "needles" in results.get("tasks", {})
    }
    if not accuracies:
        return None
    labels = sorted({label for values in accuracies.values() for label in values}, key=_needle_order)
    figure = plots.new_figure(max(6.0, 1.6 * len(labels) + 2), 4.5)
    axes = figure.add_subplot()
    width = 0.8 / len(accuracies)
    for i, (name, values) in enumerate(accuracies.items()):
        x = np.arange(len(labels)) + (i - (len(accuracies) - 1) / 2) * width
        bars = axes.bar(x, [values.get(label, np.nan) for label in labels], width, label=name)
        axes.bar_label(bars, fmt="%.2f", fontsize=8)  # a zero bar is otherwise invisible
    axes.set_xticks(range(len(labels)), labels)
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("needles N and queries R")
    axes.set_ylabel("retrieval accuracy (fraction of queries)")
    axes.set_title("Multi-needle retrieval accuracy, averaged over lengths and depths")
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    return plots.save(figure, path)


def _needle_order(label: str) -> tuple[int, ...]:
    """(N, R) of a label such as "N=4,R=2", so that N=10 sorts after N=6."""
    return tuple(int(part.split("=")[1]) for part in label.split(","))
