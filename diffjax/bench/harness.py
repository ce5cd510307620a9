"""Harness requests per second: diffjax's native `DiffjaxLM` against lm-eval's `hf` model on the export.

Both score the local corpus tasks (`diffjax.evaluate.local_tasks`, one per request type) in one process,
one after the other; only the LM's own calls are timed, not the harness's bookkeeping. diffjax runs the
tasks twice: `cold` includes compiling its programs, `warm` is what every later task of a session sees.
Imported only by `python -m diffjax.bench harness` (the `eval` and `hf` extras).
"""

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from diffjax.cli import UsageError

REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")
LMS = ("diffjax_cold", "diffjax_warm", "hf")


def timed(lm: object) -> dict[str, list[float]]:
    """Wrap `lm`'s request entry points so that each call adds (requests, seconds) to the returned totals."""
    totals = {name: [0, 0.0] for name in REQUEST_TYPES}

    def wrap(name: str, method: Callable) -> Callable:
        def run(requests: list, *args, **kwargs):
            started = time.perf_counter()
            result = method(requests, *args, **kwargs)
            totals[name][0] += len(requests)
            totals[name][1] += time.perf_counter() - started
            return result

        return run

    for name in REQUEST_TYPES:
        setattr(lm, name, wrap(name, getattr(lm, name)))
    return totals


def benchmark_harness(workdir: Path, hf: Path | None, count: int, batch_size: int) -> dict[str, dict[str, float]]:
    """Requests/s per request type: `diffjax_cold`, `diffjax_warm` and `hf` (and `requests`)."""
    try:
        import lm_eval
        import torch
        from lm_eval.models.huggingface import HFLM

        from diffjax.evaluate.harness import DiffjaxLM, task_manager
    except ImportError as error:
        raise UsageError(f"bench harness needs the eval and hf extras (pip install -e '.[eval,hf]'): {error}") from None
    from diffjax.convert.runs import export_run
    from diffjax.data.tokenizer import load_tokenizer
    from diffjax.evaluate.load import load_model
    from diffjax.evaluate.local_tasks import write_tasks

    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        tasks = write_tasks(scratch / "tasks", count)
        manager = task_manager(str(scratch / "tasks"))
        hf = hf or export_run(workdir, scratch / "hf", "hf")
        model, config = load_model(workdir)
        ours = DiffjaxLM(model, load_tokenizer(config.data.tokenizer), config.seq_len, batch_size)
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        theirs = HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=batch_size)
        rates = {}
        for name, lm in zip(LMS, [ours, ours, theirs], strict=True):
            totals = timed(lm)
            lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=False)
            rates[name] = {kind: requests / seconds for kind, (requests, seconds) in totals.items()}
            rates["requests"] = {kind: requests for kind, (requests, _) in totals.items()}
            for kind in REQUEST_TYPES:  # unwrap, so that the warm run times the LM, not two wrappers
                delattr(lm, kind)
    return rates
