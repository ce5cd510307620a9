"""Where metrics go: JSON lines for scripts, TensorBoard event files, and for people a progress bar in a
terminal or a plain line per `log_every_steps` in a log file (a pipe, `nohup`, a TPU worker's log)."""

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm


class MetricsWriter:
    """Writes `<workdir>/<name>.jsonl` records and TensorBoard scalars; silent on processes other than 0.

    A fresh run replaces earlier records; a run resumed at step s keeps those up to s and drops the
    later ones (steps that are about to be trained again), so the files read as one uninterrupted run.
    """

    def __init__(self, workdir: Path, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.started: set[str] = set()  # files this run appends to (a fresh run replaces old ones)
        if not self.enabled:
            return
        self.workdir = workdir
        if resume_step is not None:
            for path in workdir.glob("*.jsonl"):
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
                path.write_text("".join(line + "\n" for line in kept))
                self.started.add(path.stem)
        purge = None if resume_step is None else resume_step + 1  # TensorBoard hides older events from here on
        self.tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge)

    def write(self, name: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.workdir / f"{name}.jsonl", "a" if name in self.started else "w") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.started.add(name)
        for key, value in values.items():
            self.tensorboard.add_scalar(f"{name}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()

    def ends(self, name: str, key: str) -> tuple[tuple[int, float], tuple[int, float]] | None:
        """(step, value) of the first and the last record of `name` holding `key` (the whole run, resumes
        included); None when there is none."""
        steps, values = read_curve(self.workdir / f"{name}.jsonl", key) if self.enabled else ([], [])
        return ((steps[0], values[0]), (steps[-1], values[-1])) if steps else None


def read_curve(path: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in a metrics JSON-lines file; empty when the file is absent."""
    if not path.is_file():
        return [], []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def _terminal_width() -> int:
    """Columns of the terminal stderr is; 0 for a file, a pipe, or a terminal of unknown size."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError):
        return 0


def say(message: str) -> None:
    """Print a line above the progress bar (never glued to it), at once even into a file or a pipe."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def duration(seconds: float) -> str:
    """`1h 02m`, `2m 31s` or `12.3s`."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 60)}m {int(seconds % 60):02d}s" if seconds >= 60 else f"{seconds:.1f}s"


class ProgressLog:
    """Train metrics every `log_every` steps: the step's own values plus throughput over the interval.

    Device values are read only when the caller hands over a finished step, which it does after the
    next step is dispatched, so logging never stalls the device.
    """

    def __init__(
        self,
        config,
        tokens_per_step: int,
        flops_per_step: float,
        peak_tflops: float | None,
        learning_rate: Callable[[int], float],
        writer: MetricsWriter,
        start_step: int = 0,
    ):
        self.total, self.log_every = config.total_steps, config.log_every_steps
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_tflops
        self.learning_rate, self.writer = learning_rate, writer
        self.interactive = writer.enabled and _terminal_width() > 0  # else plain lines, which a log file keeps
        self.bar = tqdm(
            total=self.total, initial=start_step, unit="step", disable=not self.interactive, dynamic_ncols=True
        )
        self.trained_steps, self.trained_seconds = 0, 0.0  # this invocation's, evaluations left out
        self.restart_clock(start_step)

    def restart_clock(self, step: int) -> None:
        """Begin a throughput interval (after an evaluation, say, which is not training time)."""
        self.clock = (time.perf_counter(), step)

    def step_done(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.bar.update(step - self.bar.n)
        if step % self.log_every and step != self.total:
            return
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
        now = time.perf_counter()
        self.trained_steps += step - self.clock[1]
        self.trained_seconds += now - self.clock[0]
        seconds = (now - self.clock[0]) / max(step - self.clock[1], 1)
        devices = jax.device_count()
        values.update(
            learning_rate=float(self.learning_rate(step - 1)),
            step_time_s=seconds,
            tokens_per_s=self.tokens_per_step / seconds,
            tokens_per_s_per_device=self.tokens_per_step / seconds / devices,
            tflops_per_device=self.flops_per_step / seconds / devices / 1e12,
        )
        if self.peak:
            values["mfu"] = values["tflops_per_device"] / self.peak
        self.clock = (now, step)
        self.writer.write("metrics", step, values)
        if self.interactive:
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")
        elif self.writer.enabled:
            say(
                f"step {step}/{self.total}: loss {values['loss']:.4f}, {values['tokens_per_s']:,.0f} tokens/s, "
                f"{seconds:.3f} s/step, learning rate {values['learning_rate']:.3g}"
            )

    @property
    def tokens_per_s(self) -> float | None:
        """Training throughput of this invocation (compilation and evaluations left out)."""
        return self.trained_steps * self.tokens_per_step / self.trained_seconds if self.trained_seconds else None

    def close(self) -> None:
        self.bar.close()
