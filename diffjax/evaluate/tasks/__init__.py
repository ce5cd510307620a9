"""The evaluation tasks by name. A task is `run(context) -> TaskResult`."""

from collections.abc import Callable

from diffjax.cli import UsageError
from diffjax.evaluate.tasks import attention, generation, harness, lambdas, needles, outliers, perplexity
from diffjax.evaluate.tasks.base import EvalContext, TaskResult

TASKS: dict[str, Callable[[EvalContext], TaskResult]] = {
    "perplexity": perplexity.run,
    "needles": needles.run,
    "attention": attention.run,
    "outliers": outliers.run,
    "lambda": lambdas.run,
    "generate": generation.run,
    "harness": harness.run,
}
DEFAULT = tuple(name for name in TASKS if name != "harness")  # the harness needs --harness_tasks


def select(names: list[str]) -> list[str]:
    """The tasks `--tasks` names, in its order; `UsageError` for an unknown one."""
    if not names:
        raise UsageError(f"--tasks is empty; name some of {', '.join(TASKS)}")
    for name in names:
        if name not in TASKS:
            raise UsageError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))
