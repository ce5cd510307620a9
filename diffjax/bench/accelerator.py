"""`python -m diffjax.bench accelerator`: the one time-boxed check to run once on a new accelerator.

Five stages (`diffjax.bench.stages`), each in a process of its own with its own share of `--budget_s`:
environment, correctness (`pytest -m accelerator` on the device), kernels, train_step and end_to_end. A
stage that ends early passes what it did not use on to the next; one that overruns is killed at its share,
keeping what it had recorded. After every stage `results.json` and `results.md` in `--out` are rewritten
atomically, so a run killed at any point leaves every finished stage's figures. A process per stage also
means one stage's device memory (JAX preallocates most of a GPU) is free again for the next, and the
correctness stage's pytest process has the device to itself. docs/accelerator.md documents the schema.
"""

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from diffjax.cli import UsageError
from diffjax.files import write_atomically

SCHEMA_VERSION = 1
QUICK_BUDGET_S = 180.0  # --quick: toy sizes on CPU, about a minute and a half on 2 cores


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    share: float  # of the budget, before what earlier stages left unused
    what: str  # one line for results.md


STAGES = (
    Stage("environment", 0.05, "versions, devices and memory, the dispatcher's choice of attention core"),
    Stage("correctness", 0.2, "`pytest -m accelerator` on the device: compiled kernels and train steps vs reference"),
    Stage("kernels", 0.3, "fused kernel vs two flash calls vs dot_product_attention vs blockwise; tile sweep"),
    Stage("train_step", 0.3, "paper_1_4b in bfloat16 at T=2048 on one device: tokens/s, MFU, DIFF vs standard"),
    Stage("end_to_end", 0.15, "train.py with a checkpoint, an exact resume, and load_model on the device"),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def select(names: list[str]) -> list[Stage]:
    """The stages named (all when `names` is empty), in suite order."""
    unknown = sorted(set(names) - set(STAGE_NAMES))
    if unknown:
        raise UsageError(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(STAGE_NAMES)}")
    return [stage for stage in STAGES if not names or stage.name in names]


def check_out_dir(out: Path) -> None:
    """`--out` must be new or empty: a report never mixes two runs."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out={out} exists and is not an empty directory; name a new one")


def run_suite(out: Path, budget_s: float, quick: bool, stages: list[Stage], argv: list[str]) -> dict:
    """Run `stages` in order within `budget_s`; returns the report, also written to `out` after every stage."""
    (out / "stages").mkdir(parents=True, exist_ok=True)
    report = {
        "schema": SCHEMA_VERSION,
        "command": " ".join(argv),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "budget_s": budget_s,
        "quick": quick,
        "stages": {},
    }
    start = time.monotonic()
    platform = ""
    for index, stage in enumerate(stages):
        left = budget_s - (time.monotonic() - start)
        # Its share of what is left, in proportion to the shares still to come: time saved flows forward.
        allowance = left * stage.share / sum(s.share for s in stages[index:])
        outcome = run_stage(stage.name, out, allowance, quick, platform)
        platform = platform or outcome["results"].get("platform", "")
        report["stages"][stage.name] = outcome
        write_report(out, report)
        note = f": {outcome['error']}" if outcome["error"] else ""
        print(f"{stage.name}: {outcome['status']} in {outcome['seconds']:.0f} s of {allowance:.0f}{note}", flush=True)
    return report


def run_stage(name: str, out: Path, allowance: float, quick: bool, platform: str) -> dict:
    """Run stage `name` in a child process (its own session, so a kill takes its pytest or train.py too).

    The child is told a deadline a little before the allowance so it can stop on its own with what it has;
    at the allowance it is killed. `platform` (from the environment stage) is the device the later stages
    must use.
    """
    stage_dir = out / "stages"
    results_path, log_path = stage_dir / f"{name}.json", stage_dir / f"{name}.log"
    deadline = time.time() + allowance - min(0.1 * allowance, 30.0)
    command = [sys.executable, "-m", "diffjax.bench.stages", name, str(out), f"{deadline:.3f}", str(int(quick))]
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*command, platform], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=out
        )
        try:
            code = process.wait(timeout=max(allowance, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            code = None
    record = json.loads(results_path.read_text()) if results_path.exists() else {}
    verdict = record.get("verdict")
    if code is None:
        status, error = "timeout", f"killed at its {allowance:.0f} s share of the budget; partial results kept"
    elif code == 0 and verdict is not None:
        status = "timeout" if verdict.get("timed_out") else ("passed" if verdict["passed"] else "failed")
        error = verdict["reason"] or None
    else:
        status, error = "failed", record.get("error") or _last_line(log_path) or f"exit code {code}"
    return {
        "status": status,
        "seconds": round(time.monotonic() - started, 1),
        "budget_s": round(allowance, 1),
        "error": error,
        "log": str(log_path.relative_to(out)),
        "results": record.get("results", {}),
    }


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def write_report(out: Path, report: dict) -> None:
    write_atomically(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_atomically(out / "results.md", render_markdown(report))


def render_markdown(report: dict) -> str:
    """`results.md`: a summary table of the stages, then each stage's results (lists of rows as tables)."""
    environment = report["stages"].get("environment", {}).get("results", {})
    devices = environment.get("devices", {})
    versions = environment.get("versions", {})
    machine = f"{devices.get('count', '?')} x {devices.get('kind', '?')}, jax {versions.get('jax', '?')}"
    lines = [
        f"# Accelerator check: {machine}",
        "",
        f"`{report['command']}`, started {report['started']}, budget {report['budget_s']:.0f} s"
        + (" (--quick: toy sizes)" if report["quick"] else ""),
        "",
        "| stage | status | seconds | budget s | note |",
        "|---|---|---|---|---|",
    ]
    for name, outcome in report["stages"].items():
        cells = [name, outcome["status"], f"{outcome['seconds']:.0f}", f"{outcome['budget_s']:.0f}", outcome["error"]]
        lines.append("| " + " | ".join(_cell(cell or "") for cell in cells) + " |")
    purposes = {stage.name: stage.what for stage in STAGES}
    for name, outcome in report["stages"].items():
        lines += ["", f"## {name}", "", f"{purposes[name]}.", "", *_markdown(outcome["results"])]
    return "\n".join(lines) + "\n"


def _markdown(results: dict) -> list[str]:
    lines, tables = [], []
    for key, value in results.items():
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            tables.append((key, value))
        elif isinstance(value, dict):
            lines.append(f"- {key}: " + ", ".join(f"{k}={_cell(v)}" for k, v in value.items()))
        else:
            lines.append(f"- {key}: {_cell(value)}")
    for key, rows in tables:
        columns = list(dict.fromkeys(column for row in rows for column in row))
        lines += ["", f"### {key}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return lines


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value).replace("|", "/").replace("\n", " ")
