"""Where evaluation results live (`<workdir>/eval/<step>/`), written so that no reader sees them half-done."""

import json
from typing import Any

from etils import epath

from diffjax.cli import UsageError

RESULTS = "results.json"


def eval_directory(workdir: epath.Path, step: int) -> epath.Path:
    return workdir / "eval" / str(step)


def read_json(path: epath.Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: epath.Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def latest_results(workdir: epath.Path) -> tuple[int, dict[str, Any]]:
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
