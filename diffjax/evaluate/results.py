"""Where evaluation results live (`<workdir>/eval/<step>/`), written so that no reader sees them half-done."""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffjax.cli import UsageError

RESULTS = "results.json"


def eval_directory(workdir: Path, step: int) -> Path:
    return workdir / "eval" / str(step)


@contextlib.contextmanager
def staged(target: Path, keep_existing: bool) -> Iterator[Path]:
    """A scratch directory beside `target` that replaces it only when the block succeeds.

    With `keep_existing` the scratch starts as a copy of `target`, so tasks run now join the earlier ones.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    shutil.rmtree(scratch, ignore_errors=True)
    if keep_existing and target.is_dir():
        shutil.copytree(target, scratch)
    else:
        scratch.mkdir()
    try:
        yield scratch
        if target.exists():
            target.rename(old)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def latest_results(workdir: Path) -> tuple[int, dict[str, Any]]:
    """(step, results) of the newest evaluated step of a run."""
    steps = sorted(int(p.name) for p in (workdir / "eval").glob("*") if p.name.isdigit() and (p / RESULTS).is_file())
    if not steps:
        raise UsageError(
            f"{workdir} has no evaluation results; run `python -m diffjax.evaluate --workdir={workdir}` first"
        )
    return steps[-1], read_json(eval_directory(workdir, steps[-1]) / RESULTS)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)
