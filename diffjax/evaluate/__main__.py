"""Evaluation CLI.

    python -m diffjax.evaluate --workdir=runs/tiny_diff [--step=N] \\
        [--tasks=perplexity,needles,attention,outliers,lambda,generate] [--split=validation] [--batches=N] \\
        [--needle_lengths=512,1024,2048] [--needle_depths=0,0.25,0.5,0.75,1] [--needle_counts=1x1,2x2,4x2,6x2] \\
        [--needle_documents=4] [--needle_batch_size=8] [--attention_layer=-1 --attention_head=0] \\
        [--outlier_batches=2] [--prompt="The " ...] [--max_tokens=128] [--temperature=0 --top_k=0 --top_p=1] \\
        [--seed=0] [--data_dir=DIR]
    python -m diffjax.evaluate --workdir=runs/tiny_diff --tasks=harness --harness_tasks=arc_easy,hellaswag \\
        [--num_fewshot=N] [--limit=N] [--harness_include_path=DIR] [--harness_batch_size=16]
    python -m diffjax.evaluate compare --runs=runs/tiny_diff,runs/tiny_standard [--out=DIR]

The first prints a table and writes `<workdir>/eval/<step>/results.json` and PNG figures; the second puts
evaluated runs side by side in `--out` (default: the first run's `eval/compare/`).
"""

import dataclasses

from absl import flags

from diffjax import files
from diffjax.cli import UsageError, run_main
from diffjax.evaluate import sampling_flags
from diffjax.evaluate.tasks import DEFAULT as DEFAULT_TASKS
from diffjax.evaluate.tasks.base import EvalOptions, GenerationOptions, HarnessOptions, NeedleGrid

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_TASKS = flags.DEFINE_list(
    "tasks", list(DEFAULT_TASKS), "Tasks to run, comma-separated (harness also needs --harness_tasks)."
)
_SPLIT = flags.DEFINE_string("split", "validation", "perplexity and outliers: data split.")
_BATCHES = flags.DEFINE_integer("batches", 0, "perplexity: batches of the split (0: the run's eval_batches).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where the run's data lives, if not where it trained.")
_LENGTHS = flags.DEFINE_list("needle_lengths", ["512", "1024", "2048"], "needles: context lengths in bytes.")
_DEPTHS = flags.DEFINE_list("needle_depths", ["0", "0.25", "0.5", "0.75", "1"], "needles: needle depths in [0, 1].")
_COUNTS = flags.DEFINE_list("needle_counts", ["1x1", "2x2", "4x2", "6x2"], "needles: N needles x R queries.")
_DOCUMENTS = flags.DEFINE_integer("needle_documents", 4, "needles: documents per (length, depth, N, R) cell.")
_NEEDLE_BATCH = flags.DEFINE_integer("needle_batch_size", 8, "needles: documents per forward pass.")
_MAP_LAYER = flags.DEFINE_integer(
    "attention_layer", -1, "attention: layer of the map figure (negative: from the last)."
)
_MAP_HEAD = flags.DEFINE_integer("attention_head", 0, "attention: head of the map figure.")
_OUTLIER_BATCHES = flags.DEFINE_integer("outlier_batches", 2, "outliers: batches of the split.")
_HARNESS_TASKS = flags.DEFINE_list("harness_tasks", [], "harness: lm-evaluation-harness task names.")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "harness: few-shot examples (default: each task's own).")
_LIMIT = flags.DEFINE_integer("limit", None, "harness: first N items of each task (default: all).")
_INCLUDE = flags.DEFINE_string("harness_include_path", "", "harness: a directory of your own task YAML files.")
_HARNESS_BATCH = flags.DEFINE_integer("harness_batch_size", 16, "harness: sequences per forward pass.")
_RUNS = flags.DEFINE_list("runs", [], "compare: evaluated run directories, comma-separated.")
_OUT = flags.DEFINE_string("out", "", "compare: output directory (default: <first run>/eval/compare).")


def needle_grid() -> NeedleGrid:
    from diffjax.evaluate.tasks.needles import check_grid

    try:
        grid = NeedleGrid(
            lengths=tuple(int(x) for x in _LENGTHS.value),
            depths=tuple(float(x) for x in _DEPTHS.value),
            counts=tuple(tuple(int(n) for n in x.lower().split("x", 1)) for x in _COUNTS.value),
            documents=_DOCUMENTS.value,
            batch_size=_NEEDLE_BATCH.value,
        )
    except ValueError as error:
        raise UsageError(f"--needle_lengths, --needle_depths and --needle_counts (NxR) take numbers: {error}") from None
    if not (grid.lengths and grid.depths and grid.counts) or any(len(c) != 2 for c in grid.counts):
        raise UsageError("--needle_lengths, --needle_depths and --needle_counts (NxR, e.g. 4x2) must be non-empty")
    check_grid(grid)
    return grid


def harness_options(tasks: list[str]) -> HarnessOptions:
    """The harness flags, checked (task names too) before any checkpoint is read; defaults when unused."""
    if "harness" not in tasks:
        return HarnessOptions()
    try:
        from diffjax.evaluate.harness import check_tasks
    except ImportError:
        raise UsageError("--tasks=harness needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    if _FEWSHOT.value is not None and _FEWSHOT.value < 0:
        raise UsageError(f"--num_fewshot={_FEWSHOT.value} must be at least 0")
    if _LIMIT.value is not None and _LIMIT.value < 1:
        raise UsageError(f"--limit={_LIMIT.value} must be at least 1 (leave it out for every item)")
    if _HARNESS_BATCH.value < 1:
        raise UsageError(f"--harness_batch_size={_HARNESS_BATCH.value} must be at least 1")
    check_tasks(_HARNESS_TASKS.value, _INCLUDE.value)
    return HarnessOptions(
        tuple(_HARNESS_TASKS.value), _FEWSHOT.value, _LIMIT.value, _INCLUDE.value, _HARNESS_BATCH.value
    )


def evaluate() -> None:
    from diffjax.evaluate.runner import evaluate as run_tasks
    from diffjax.evaluate.tasks import select

    if not _WORKDIR.value:
        raise UsageError("pass --workdir=<run dir>")
    tasks = select(_TASKS.value)
    if _BATCHES.value < 0:
        raise UsageError("--batches must be >= 0 (0: the run's eval_batches)")
    if _OUTLIER_BATCHES.value < 1:
        raise UsageError(f"--outlier_batches={_OUTLIER_BATCHES.value} must be at least 1")
    sampling = sampling_flags.sampling()
    options = EvalOptions(
        _SPLIT.value,
        _BATCHES.value,
        needle_grid(),
        map_layer=_MAP_LAYER.value,
        map_head=_MAP_HEAD.value,
        outlier_batches=_OUTLIER_BATCHES.value,
        generation=GenerationOptions(
            tuple(sampling_flags.PROMPTS.value), sampling_flags.MAX_TOKENS.value, sampling, sampling_flags.SEED.value
        ),
    )
    files.check_access(_WORKDIR.value, "--workdir", write=True)  # results go to <workdir>/eval/<step>/
    workdir = files.path(_WORKDIR.value)
    if not workdir.is_dir():
        raise UsageError(f"workdir {workdir} does not exist")
    options = dataclasses.replace(options, harness=harness_options(tasks))
    run_tasks(workdir, _STEP.value, tasks, options, _DATA_DIR.value)


def compare() -> None:
    from diffjax.evaluate.compare import compare as compare_runs

    for run in _RUNS.value:
        files.check_access(run, "--runs")
    if _OUT.value:
        files.check_access(_OUT.value, "--out", write=True)
    compare_runs([files.path(run) for run in _RUNS.value], files.path(_OUT.value) if _OUT.value else None)


def main(argv: list[str]) -> None:
    if argv[1:] == ["compare"]:
        compare()
    elif not argv[1:]:
        evaluate()
    else:
        raise UsageError(f"unexpected arguments {argv[1:]}; the only command is `compare` (or none to evaluate)")


if __name__ == "__main__":
    run_main("python -m diffjax.evaluate", main)
