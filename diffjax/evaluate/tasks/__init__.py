"""The evaluation tasks by name. A task is `run(context) -> TaskResult`; planned ones are refused by name."""

from collections.abc import Callable

from diffjax.cli import UsageError
from diffjax.evaluate.tasks import lambdas, needles, perplexity
from diffjax.evaluate.tasks.base import EvalContext, TaskResult

TASKS: dict[str, Callable[[EvalContext], TaskResult]] = {
    "perplexity": perplexity.run,
    "needles": needles.run,
    "lambda": lambdas.run,
}
PLANNED = {  # need model instrumentation or the KV cache, which are not built yet
    "attention": "attention-mass shares need the model to return attention maps",
    "outliers": "logit and hidden-state statistics need the model to return its activations",
    "generate": "sampling needs the KV cache",
}


def select(names: list[str]) -> list[str]:
    """The tasks `--tasks` names, in its order; `UsageError` for an unknown or not yet available one."""
    if not names:
        raise UsageError(f"--tasks is empty; name some of {', '.join(TASKS)}")
    for name in names:
        if name in PLANNED:
            raise UsageError(f"task {name!r} is not available yet ({PLANNED[name]}); available: {', '.join(TASKS)}")
        if name not in TASKS:
            raise UsageError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))
