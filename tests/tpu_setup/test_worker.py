"""tpu_setup/worker/run.sh on this machine: a detached run that is found again, and stop touches only it."""

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

RUN = REPO / "tpu_setup" / "worker" / "run.sh"
# Stands in for train.py: on SIGTERM it says so and exits 0, as train.py does once its checkpoint is saved.
TRAINER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(print("saved")))
print("up", flush=True)
time.sleep(120)
"""
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"


@pytest.fixture
def worker(tmp_path):
    env = dict(os.environ, DIFFJAX_RUNS=str(tmp_path))

    def run(*args: str) -> str:
        result = subprocess.run(["bash", str(RUN), *args], capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    yield run
    for pid_file in tmp_path.glob("*/group"):  # nothing outlives a failed test
        subprocess.run(["kill", "-KILL", "--", f"-{pid_file.read_text().strip()}"], capture_output=True)


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_run_starts_once_stops_with_sigterm_and_leaves_other_processes_alone(worker, tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert "started r1" in worker("start", "r1", "--", sys.executable, "-c", TRAINER)
        assert worker("status", "r1") == "running"
        assert "already running" in worker("start", "r1", "--", sys.executable, "-c", TRAINER)
        wait_for(lambda: "up" in worker("log", "r1"))
        assert worker("status", "other") == "absent"
        assert worker("stop", "other") == f"{os.uname().nodename}: other is not running"

        assert "r1 stopped (exit 0)" in worker("stop", "r1", "30")
        assert worker("status", "r1") == "stopped"
        assert bystander.poll() is None
        log = worker("log", "r1")
        assert log.splitlines()[-1] == f"{os.uname().nodename}: saved"
        assert log.count("starts:") == 1  # the second start did not start anything
    finally:
        bystander.kill()


def test_a_run_that_ignores_sigterm_is_killed_after_the_timeout(worker):
    worker("start", "r2", "--", sys.executable, "-c", STUBBORN)
    wait_for(lambda: worker("status", "r2") == "running")
    assert "did not stop within 1s: killed" in worker("stop", "r2", "1")
    wait_for(lambda: worker("status", "r2") != "running")


def test_the_exit_code_is_kept_and_a_restart_is_not_a_stop(worker):
    worker("start", "r3", "--", "bash", "-c", "exit 3")
    wait_for(lambda: worker("status", "r3") == "exited 3")
    worker("stop", "r3", "5", "--restart")
    assert worker("status", "r3") == "exited 3"


def test_a_missing_mount_refuses_to_start(tmp_path):
    result = subprocess.run(
        ["bash", str(RUN), "start", "r4", "--mount", str(tmp_path), "--", "true"],
        capture_output=True,
        text=True,
        env=dict(os.environ, DIFFJAX_RUNS=str(tmp_path)),
    )
    assert result.returncode == 2
    assert result.stderr.endswith(
        f"{tmp_path} is not mounted (run tpu_setup/setup.sh); not starting on the local disk\n"
    )
