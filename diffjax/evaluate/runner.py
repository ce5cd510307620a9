"""Evaluate one checkpoint: load it, run the chosen tasks, print a table, write `<workdir>/eval/<step>/`."""

import time
from collections.abc import Callable

from etils import epath

from diffjax.cli import UsageError
from diffjax.config import check_tokenizer
from diffjax.data.tokenizer import load_tokenizer
from diffjax.evaluate.load import load_model
from diffjax.evaluate.results import RESULTS, eval_directory, format_table, read_json, write_json
from diffjax.evaluate.tasks import TASKS
from diffjax.evaluate.tasks.base import EvalContext, EvalOptions, TaskResult, model_summary
from diffjax.files import absolute, staged
from diffjax.train.checkpoint import CHECKPOINTS


def evaluate(
    workdir: epath.Path, step: int | None, tasks: list[str], options: EvalOptions, data_dir: str = ""
) -> epath.Path:
    """Run `tasks` on `step` (default: the latest) of the run in `workdir`; returns the results directory.

    `data_dir` overrides where the run's data lives (the config records where it trained).
    Results of tasks run earlier on the same step are kept unless run again.
    """
    if not (workdir / CHECKPOINTS).is_dir():
        raise UsageError(f"{workdir} is not a run directory (it has no {CHECKPOINTS}/); pass --workdir=<run dir>")
    model, config = load_model(workdir, step)
    if data_dir:
        config.data.data_dir = data_dir
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_tokenizer(config, tokenizer)
    target = eval_directory(workdir, model.step)
    with staged(target, keep_existing=True) as out:
        context = EvalContext(model, config, tokenizer, options, out, absolute(workdir).name)
        results = {name: _timed(TASKS[name], context) for name in tasks}
        summary = model_summary(model, config)
        earlier = read_json(out / RESULTS).get("tasks", {})
        figures = {name: result.figures for name, result in results.items()}
        write_json(out / RESULTS, {"step": model.step, "model": summary, "tasks": earlier | figures})
    print(
        f"{workdir} step {model.step}: {summary['attention_type']} attention, "
        f"{summary['parameters'] / 1e6:.2f}M parameters -> {target}"
    )
    print(report(results))
    return target


def _timed(task: Callable[[EvalContext], TaskResult], context: EvalContext) -> TaskResult:
    """`task(context)` with its wall time (compilation included) in its figures and its printed rows."""
    started = time.perf_counter()
    result = task(context)
    seconds = time.perf_counter() - started
    result.figures["seconds"] = seconds
    result.summary["seconds"] = f"{seconds:.1f}"
    return result


def report(results: dict[str, TaskResult]) -> str:
    """The printed table: one row per task metric, then each task's own tables."""
    rows = [[task, metric, value] for task, result in results.items() for metric, value in result.summary.items()]
    tables = [table for result in results.values() for table in result.tables]
    return "\n\n".join([format_table(["task", "metric", "value"], rows), *tables])
