import contextlib
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
from conftest import REPO

from diffjax.parallel.mesh import cpu_device_count


@pytest.mark.slow
def test_train_cli_trains_evaluates_logs_and_samples(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/tiny.py:diff",
            f"--config.workdir={workdir}",
            f"--config.data.data_dir={tmp_path / 'data'}",
            "--config.total_steps=30",
            "--config.warmup_steps=5",
            "--config.batch_size=8",
            "--config.seq_len=64",
            "--config.log_every_steps=10",
            "--config.eval_every_steps=20",
            "--config.eval_batches=2",
            "--config.sample_tokens=16",
            "--config.model.num_layers=2",
            "--config.profile_start_step=3",
            "--config.profile_steps=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    for record in records:
        assert {"step", "loss", "learning_rate", "tokens_per_s", "grad_norm"} <= record.keys()
        assert record["tokens_per_s"] > 0 and record["learning_rate"] > 0
    evals = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 20, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.0
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 30
    assert "validation loss" in result.stdout and "sample: 'The " in result.stdout
    assert "train step per device: arguments" in result.stdout  # the compiled step's memory analysis
    cores = len(os.sched_getaffinity(0))
    assert f"over {cpu_device_count((1, -1, 1), 8, cores)} cpu devices" in result.stdout  # a device per core
    assert list((workdir / "profile").rglob("*.xplane.pb"))  # the jax.profiler trace of steps 3-4
    assert {"param_norm", "step_time_s", "tokens_per_s_per_device", "tflops_per_device", "mfu"} <= records[0].keys()


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"--config.workdir={tmp_path / 'run'}",
            f"--config.data.data_dir={tmp_path / 'data'}",
            "--config.learning_rate=1e30",
            "--config.end_learning_rate=0",
            "--config.warmup_steps=0",
            "--config.grad_clip_norm=1e30",
            "--config.total_steps=20",
            "--config.batch_size=4",
            "--config.seq_len=32",
            "--config.model.num_layers=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: step ") and "is not finite; the update was not applied" in last, last


KEYS_DOCUMENTED = "docs/config.md lists every key; `python train.py --print_config` prints a run's resolved config"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.modle.num_layers=2", "unknown config key 'modle.num_layers'; did you mean 'model.num_layers'?"),
        ("--config.model.num_layer=2", "unknown config key 'model.num_layer'; did you mean 'model.num_layers'?"),
        ("--config.total_step=5", "unknown config key 'total_step'; did you mean 'total_steps'?"),
        ("--config.zzzz=1", "unknown config key 'zzzz'"),
    ],
)
def test_a_misspelt_key_is_named_with_the_nearest_one_in_one_clean_line(override, message):
    command = [sys.executable, str(REPO / "train.py"), "--config=configs/tiny.py:standard", override]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr == f"train.py: error: {message}; {KEYS_DOCUMENTED}\n"


SMALL_RUN = [
    "--config.total_steps=6",
    "--config.log_every_steps=2",
    "--config.eval_every_steps=0",
    "--config.checkpoint_every_steps=4",
    "--config.eval_batches=1",
    "--config.sample_tokens=4",
    "--config.model.num_layers=1",
]


def train(workdir, *overrides, tty: bool = False) -> tuple[int, str]:
    """Run train.py on a small config; (exit code, output). With `tty` stdout and stderr are a terminal of
    100 columns (one of unknown size gets the plain lines of a log file)."""
    command = [sys.executable, "train.py", f"--config.workdir={workdir}", *SMALL_RUN, *overrides]
    if not tty:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        return result.returncode, result.stdout
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = b""
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while chunk := os.read(controller, 65536):
            output += chunk
    os.close(controller)
    return process.wait(timeout=600), output.decode(errors="replace")


@pytest.mark.slow
def test_a_log_file_gets_a_plain_line_per_log_interval_and_both_runs_end_with_a_summary(tmp_path):
    code, first = train(tmp_path / "run")
    assert code == 0, first
    assert re.search(r"^step 0: validation loss [\d.]+$", first, re.MULTILINE)
    for step in (2, 4, 6):
        assert re.search(rf"^step {step}/6: loss [\d.]+, [\d,]+ tokens/s, [\d.]+ s/step, learning rate ", first, re.M)
    assert "\r" not in first and "it/s" not in first  # no progress bar in a file
    step0 = re.search(r"step 0: validation loss ([\d.]+)", first)[1]
    code, resumed = train(tmp_path / "run", "--config.total_steps=8")
    assert code == 0, resumed
    assert "resuming at step 6" in resumed and re.search(r"^step 8/8: loss", resumed, re.M)
    for output, steps, last in [(first, 6, 6), (resumed, 2, 8)]:
        summary = output[output.index("done at step") :].splitlines()
        assert re.fullmatch(rf"done at step {last} of {last}: [\d.ms ]+ for {steps} steps, [\d,]+ tokens/s", summary[0])
        assert re.fullmatch(rf"validation loss {step0} at step 0 -> [\d.]+ at step {last}", summary[1])
        assert re.fullmatch(rf"training loss [\d.]+ at step 2 -> [\d.]+ at step {last}", summary[2])
        assert summary[3] == f"checkpoint: {tmp_path / 'run' / 'checkpoints' / str(last)}"
        assert summary[4].startswith(f"metrics: {tmp_path / 'run' / 'metrics.jsonl'}")


@pytest.mark.slow
def test_a_terminal_gets_a_bar_that_a_resumed_run_starts_at_its_step_and_lines_never_glue_to_it(tmp_path):
    code, first = train(tmp_path / "run", tty=True)
    assert code == 0, first
    lines = first.replace("\r\n", "\n").split("\n")
    assert any(line.split("\r")[-1].startswith("step 0: validation loss") for line in lines), first
    assert not re.search(r"^step \d+/6: loss", first, re.M)  # the bar carries the loss instead
    code, resumed = train(tmp_path / "run", "--config.total_steps=8", tty=True)
    assert code == 0, resumed
    bars = re.findall(r"\| *(\d+)/8 \[", resumed)
    assert bars and bars[0] == "6" and bars[-1] == "8", bars
    assert "done at step 8 of 8" in resumed


def test_print_config_prints_every_key_its_value_and_meaning_and_builds_nothing(tmp_path):
    from diffjax.config import KEY_HELP

    workdir = tmp_path / "never-created"
    command = [sys.executable, "train.py", "--print_config", f"--config.workdir={workdir}"]
    result = subprocess.run([*command, "--config.model.num_layers=2"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = {line.split(" = ")[0]: line for line in result.stdout.splitlines()}
    assert printed.keys() == KEY_HELP.keys()
    assert re.fullmatch(r"model\.num_layers = 2 +# decoder layers", printed["model.num_layers"])
    assert not workdir.exists()
    refused = subprocess.run([*command, "--config.batch_size=0"], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("error:") == 1 and "batch_size" in refused.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_shows_the_config_flag_print_config_and_where_keys_are_documented(flag):
    result = subprocess.run([sys.executable, "train.py", flag], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    for shown in ["--config: a config file", "--config.KEY=VALUE", "--print_config", "docs/config.md"]:
        assert shown in result.stdout
