"""Where metrics go: JSON lines for scripts, TensorBoard event files for people."""

import json
from pathlib import Path

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
    """Writes `<workdir>/<name>.jsonl` records and TensorBoard scalars; silent on processes other than 0."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        self.started: set[str] = set()  # files already begun by this run (a fresh run replaces old ones)
        if self.enabled:
            self.workdir = workdir
            self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

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
