"""Where metrics go: JSON lines for scripts, TensorBoard event files, and for people a progress bar in a
terminal or a plain line per `log_every_steps` in a log file (a pipe, `nohup`, a TPU worker's log).

In a local workdir each record is appended as it comes. Objects in Cloud Storage cannot be appended to,
so there each file is kept whole (JSON lines in memory, TensorBoard event files in a local scratch
directory) and uploaded as one object, replacing the last, at least every `UPLOAD_EVERY_S` seconds and
before every checkpoint is started: whatever a checkpoint of step s restores, the records up to s are
stored, so a preempted run loses only records that its resume trains again. All uploads go through
gcsfs, so a failing bucket gives one error, raised once.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import jax
from etils import epath
from tensorboardX import SummaryWriter
from tqdm import tqdm

from diffjax import files
from diffjax.cli import RunFailure

UPLOAD_EVERY_S = 30.0  # a gs:// workdir's metrics files are re-uploaded this often (and at every checkpoint)


class MetricsWriter:
    """Writes `<workdir>/<name>.jsonl` records and TensorBoard scalars; silent on processes other than 0.

    A fresh run replaces earlier records; a run resumed at step s keeps those up to s and drops the
    later ones (steps that are about to be trained again), so the files read as one uninterrupted run.
    """

    def __init__(self, workdir: epath.Path, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.started: set[str] = set()  # files this run appends to (a fresh run replaces old ones)
        if not self.enabled:
            return
        self.workdir, self.remote = workdir, files.is_remote(workdir)
        self.lines: dict[str, list[str]] = {}  # gs://: every line of each file, uploaded whole
        self.unsaved: set[str] = set()
        self.uploaded, self.failed = time.monotonic(), False
        if resume_step is not None:
            for path in workdir.glob("*.jsonl"):
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
                files.write_atomically(path, "".join(line + "\n" for line in kept))
                self.started.add(path.stem)
                self.lines[path.stem] = kept
        purge = None if resume_step is None else resume_step + 1  # TensorBoard hides older events from here on
        self.events = epath.Path(tempfile.mkdtemp(prefix="diffjax-tensorboard-")) if self.remote else None
        self.tensorboard = SummaryWriter(os.fspath(self.events or workdir / "tensorboard"), purge_step=purge)

    def write(self, name: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **values})
        if self.remote:
            self.lines.setdefault(name, []).append(line)
            self.unsaved.add(name)
            if time.monotonic() - self.uploaded > UPLOAD_EVERY_S:
                self.flush()
        else:
            with (self.workdir / f"{name}.jsonl").open("a" if name in self.started else "w") as f:
                f.write(line + "\n")
        self.started.add(name)
        for key, value in values.items():
            self.tensorboard.add_scalar(f"{name}/{key}", value, step)

    def flush(self, when: str = "") -> None:
        """Store every record written so far (a no-op for a local workdir, where each is appended at once).

        A failed upload is a `RunFailure` naming `when` (say, "before the checkpoint of step 10").
        """
        if not self.enabled or not self.remote:
            return
        try:
            for name in sorted(self.unsaved):
                text = "".join(line + "\n" for line in self.lines[name])
                files.write_atomically(self.workdir / f"{name}.jsonl", text)
            self.tensorboard.flush()
            for events in self.events.iterdir():  # one file per writer, named by time and host: never clashes
                files.write_atomically(self.workdir / "tensorboard" / events.name, events.read_bytes())
        except Exception as error:  # gcsfs raises aiohttp's errors after retrying, OSError for HTTP errors
            self.failed = True  # closing then skips the upload: the failure is reported once
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise RunFailure(
                f"storing the metrics in {self.workdir}{' ' + when if when else ''} failed ({reason}); run the same "
                "command again once the storage is reachable: it resumes from the latest complete checkpoint"
            ) from error
        self.unsaved.clear()
        self.uploaded = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            try:
                if not self.failed:
                    self.flush()
            finally:
                self.tensorboard.close()
                if self.events:
                    shutil.rmtree(self.events, ignore_errors=True)

    def ends(self, name: str, key: str) -> tuple[tuple[int, float], tuple[int, float]] | None:
        """(step, value) of the first and the last record of `name` holding `key` (the whole run, resumes
        included); None when there is none."""
        self.flush()
        steps, values = read_curve(self.workdir / f"{name}.jsonl", key) if self.enabled else ([], [])
        return ((steps[0], values[0]), (steps[-1], values[-1])) if steps else None


def read_curve(path: epath.Path, key: str) -> tuple[list[int], list[float]]:
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
