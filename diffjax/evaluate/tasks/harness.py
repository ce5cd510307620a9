"""Downstream tasks of EleutherAI's lm-evaluation-harness (`--tasks=harness --harness_tasks=arc_easy,...`).

The checkpoint is scored by `diffjax.evaluate.harness.DiffjaxLM` in JAX; lm-eval (the `eval` extra) builds
the requests and the metrics. `results.json` keeps each harness task's metrics and their standard errors.
"""

import math
from typing import Any

from diffjax.evaluate.tasks.base import EvalContext, TaskResult

SUFFIX = ",none"  # lm-eval names a metric `metric,filter`; `none` is the unfiltered one


def run(context: EvalContext) -> TaskResult:
    import lm_eval
    from lm_eval.utils import make_table

    from diffjax.evaluate.harness import DiffjaxLM, task_manager

    options = context.options.harness
    lm = DiffjaxLM(context.model, context.tokenizer, context.config.seq_len, options.batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(options.tasks),
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        task_manager=task_manager(options.include_path),
        log_samples=False,
    )
    metrics = {task: _metrics(values) for task, values in results["results"].items()}
    figures = {
        "tasks": metrics,
        "num_fewshot": options.num_fewshot,
        "limit": options.limit,
        "samples": {task: counts["effective"] for task, counts in results.get("n-samples", {}).items()},
        "requests": lm.requests,
        "seconds": lm.seconds,
        "requests_per_s": lm.requests / lm.seconds if lm.seconds else None,
        "lm_eval_version": lm_eval.__version__,
    }
    summary = {
        f"{task} {name}": _format(value, values.get(f"{name}_stderr"))
        for task, values in metrics.items()
        for name, value in values.items()
        if not name.endswith("_stderr")
    }
    summary["requests_per_s"] = f"{figures['requests_per_s'] or 0:,.1f} ({lm.requests} requests)"
    return TaskResult(figures, summary, (make_table(results),))


def _metrics(values: dict[str, Any]) -> dict[str, float | None]:
    """`{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}` -> `{"acc": 0.5, "acc_stderr": 0.1}`;
    values the harness could not compute ("N/A") become None."""
    numbers = {}
    for key, value in values.items():
        if "," in key:
            name = key.removesuffix(SUFFIX)
            numbers[name] = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
    return numbers


def _format(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
