"""gs:// paths end to end against a Cloud Storage server on loopback (`diffjax.gcs_emulator`): training with
exact resume after SIGKILL, SIGTERM, a damaged checkpoint, reading a run back (generate, evaluate, convert
export and import, load_model), and the failures a user meets (no bucket, no credentials, no permission,
the network gone mid-run). The server keeps each object as a file under `root/<bucket>/<name>`, which
the tests read to see what landed in the bucket."""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from conftest import SHORT_RUN as RUN
from conftest import SHORT_RUN_STEPS as STEPS

from diffjax.gcs_emulator import LocalGCS

pytestmark = pytest.mark.xdist_group("gcs")  # one test process runs them all, on its one server

BUCKET = "diffjax-test"


def run(program: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *program], cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )


def train_command(workdir: str, cache: Path, *extra: str) -> list[str]:
    data = [f"--config.data.data_dir=gs://{BUCKET}/tfds", f"--config.data.cache_dir={cache}"]
    return ["train.py", f"--config.workdir={workdir}", *data, *RUN, *extra]


def stored(server: LocalGCS, url: str) -> Path:
    """Where the server keeps the object (or prefix) `url`."""
    return server.root / url.removeprefix("gs://")


def trajectory(server: LocalGCS, workdir: str) -> list[tuple]:
    lines = stored(server, f"{workdir}/metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["grad_norm"], r["param_norm"]) for r in map(json.loads, lines)]


def committed_steps(server: LocalGCS, workdir: str) -> list[int]:
    steps = stored(server, f"{workdir}/checkpoints")
    return sorted(int(p.name) for p in steps.iterdir() if (p / "commit_success.txt").is_file())


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, f"the run ended before {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def bucket(gcs: LocalGCS) -> str:
    return gcs.create_bucket(BUCKET)


@pytest.fixture(scope="module")
def finished(gcs: LocalGCS, bucket: str, tmp_path_factory) -> str:
    """Run A: 12 uninterrupted steps into gs://, its dataset built, uploaded and read through a local copy,
    its compilation cache in the bucket too."""
    workdir, cache = f"{bucket}/run_a", f"--config.compilation_cache_dir={bucket}/jax-cache"
    result = run(train_command(workdir, tmp_path_factory.mktemp("cache"), cache), gcs.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert committed_steps(gcs, workdir) == [5, 10, 12]
    assert any(stored(gcs, f"{bucket}/jax-cache").iterdir())
    assert stored(gcs, f"{bucket}/tfds/diffjax_corpus/1.0.0/dataset_info.json").is_file()
    assert [p.name.startswith("events.out.tfevents") for p in stored(gcs, f"{workdir}/tensorboard").iterdir()] == [True]
    return workdir


@pytest.mark.slow
def test_sigkill_then_rerun_on_gcs_reproduces_the_uninterrupted_run_bitwise(gcs, bucket, finished, tmp_path):
    workdir = f"{bucket}/run_b"
    command = train_command(workdir, tmp_path / "cache")  # another host's cache: the dataset comes down
    process = subprocess.Popen([sys.executable, *command], cwd=REPO, env={**os.environ, **gcs.env()})
    wait_for(lambda: stored(gcs, f"{workdir}/checkpoints/5/commit_success.txt").is_file(), process, "step 5")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(committed_steps(gcs, workdir)) < STEPS

    result = run(command, gcs.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"resuming at step (5|10) from gs://{BUCKET}/run_b/checkpoints/", result.stdout), result.stdout
    assert trajectory(gcs, workdir) == trajectory(gcs, finished)
    assert stored(gcs, f"{workdir}/eval.jsonl").read_text() == stored(gcs, f"{finished}/eval.jsonl").read_text()


@pytest.mark.slow
def test_sigterm_on_gcs_saves_exits_zero_and_resumes(gcs, bucket, finished, tmp_path):
    workdir = f"{bucket}/run_term"
    command = train_command(workdir, tmp_path / "cache")
    process = subprocess.Popen(
        [sys.executable, *command], cwd=REPO, env={**os.environ, **gcs.env()}, stdout=subprocess.PIPE, text=True
    )
    first_step = re.compile(r"step 1/")
    lines: list[str] = []
    for line in process.stdout:  # metrics reach the bucket at checkpoints only: watch the console instead
        lines.append(line)
        if first_step.match(line):
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=300) == 0
    saved = re.search(r"saved step (\d+) to (\S+); run again to resume", "".join(lines))
    assert saved, "".join(lines)[-2000:]
    step = int(saved.group(1))
    assert saved.group(2) == f"{workdir}/checkpoints/{step}" and committed_steps(gcs, workdir) == [step]
    assert [r[0] for r in trajectory(gcs, workdir)] == list(range(1, step + 1))  # stored before the checkpoint

    result = run(command, gcs.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {step} from " in result.stdout
    assert trajectory(gcs, workdir) == trajectory(gcs, finished)


COPY_SCRIPT = "import gcsfs, sys; gcsfs.GCSFileSystem().copy(sys.argv[1], sys.argv[2], recursive=True)"


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_on_gcs_is_skipped_for_the_previous_one(gcs, bucket, finished, tmp_path):
    workdir = f"{bucket}/run_damaged"
    copied = run(["-c", COPY_SCRIPT, finished, workdir], gcs.env())
    assert copied.returncode == 0, copied.stderr[-2000:]
    params = stored(gcs, f"{workdir}/checkpoints/12/params")
    largest = max((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)

    result = run(train_command(workdir, tmp_path / "cache", f"--config.total_steps={STEPS + 2}"), gcs.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: checkpoint {workdir}/checkpoints/12 is unreadable" in result.stderr
    assert "resuming at step 10 from " in result.stdout
    assert committed_steps(gcs, workdir)[-1] == STEPS + 2
    assert [p.name.split("-")[0] for p in stored(gcs, f"{workdir}/checkpoints.damaged").iterdir()] == ["12"]


LOGITS_SCRIPT = """
import sys, numpy as np
from diffjax import load_model
model, _ = load_model(sys.argv[1])
np.save(sys.argv[2], np.asarray(model(np.arange(24, dtype=np.int32).reshape(2, 12))))
"""


def logits_of(gcs: LocalGCS, workdir: str, out: Path) -> np.ndarray:
    """What `load_model(workdir)` predicts for fixed tokens, in a process pointed at the server."""
    result = run(["-c", LOGITS_SCRIPT, workdir, str(out)], gcs.env())
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


@pytest.mark.slow
def test_a_run_on_gcs_is_read_back_by_generate_evaluate_and_convert(gcs, bucket, finished, tmp_path):
    prompt = ["--prompt=The ", "--max_tokens=8"]
    generated = run(["-m", "diffjax.generate", f"--workdir={finished}", *prompt], gcs.env())
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr[-3000:]

    evaluated = run(["-m", "diffjax.evaluate", f"--workdir={finished}", "--tasks=perplexity"], gcs.env())
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads(stored(gcs, f"{finished}/eval/12/results.json").read_text())
    assert results["step"] == STEPS and results["tasks"]["perplexity"]["loss"] > 0

    exported, imported = f"{bucket}/exported", f"{bucket}/imported"
    export = run(["-m", "diffjax.convert", "export", f"--workdir={finished}", f"--out={exported}"], gcs.env())
    assert export.returncode == 0, export.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in stored(gcs, exported).iterdir()}
    back = run(["-m", "diffjax.convert", "import", f"--hf={exported}", f"--out={imported}"], gcs.env())
    assert back.returncode == 0, back.stderr[-3000:]
    assert "gcloud storage cp" in back.stdout and committed_steps(gcs, imported) == [0]
    assert f"config.data.tokenizer = '{imported}/tokenizer.json'" in stored(gcs, f"{imported}/config.py").read_text()
    from_import = run(["-m", "diffjax.generate", f"--workdir={imported}", *prompt], gcs.env())  # tokenizer on gs://
    assert from_import.returncode == 0, from_import.stderr[-3000:]
    assert from_import.stdout.splitlines()[0] == generated.stdout.splitlines()[0]  # the same text
    original, roundtrip = logits_of(gcs, finished, tmp_path / "a.npy"), logits_of(gcs, imported, tmp_path / "b.npy")
    np.testing.assert_allclose(roundtrip, original, rtol=0, atol=1e-5)  # the HF layout folds the gain into o_proj

    again = run(["-m", "diffjax.convert", "export", f"--workdir={finished}", f"--out={exported}"], gcs.env())
    assert again.returncode == 2 and "already exists" in again.stderr.strip().splitlines()[-1]

    runs = f"--runs={finished},{finished}"  # the same run twice is enough to read both from gs://
    compared = run(["-m", "diffjax.evaluate", "compare", runs, f"--out={bucket}/compare"], gcs.env())
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert json.loads(stored(gcs, f"{bucket}/compare/compare.json").read_text())["runs"]


def refused(result: subprocess.CompletedProcess) -> str:
    """The one error line of a run refused at start-up (exit code 2, no step trained)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "validation loss" not in result.stdout
    return result.stderr.strip().splitlines()[-1]


def test_a_missing_bucket_is_refused_before_training(gcs, bucket, tmp_path):
    line = refused(run(train_command("gs://no-such-bucket-here/run", tmp_path), gcs.env()))
    assert line.startswith("train.py: error: workdir=gs://no-such-bucket-here/run: bucket gs://no-such-bucket-here ")
    assert "does not exist" in line and "gcloud storage buckets create" in line


def test_missing_credentials_are_refused_before_anything_is_sent(tmp_path):
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "absent.json"), "NO_GCE_CHECK": "true"}
    clean = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    result = subprocess.run(
        [sys.executable, *train_command("gs://some-bucket/run", tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean | env,
    )
    line = refused(result)
    assert line.startswith("train.py: error: workdir=gs://some-bucket/run: no Google Cloud credentials"), line
    assert "gcloud auth application-default login" in line


class _Forbidden(http.server.BaseHTTPRequestHandler):
    """Cloud Storage's answer to an account without access: HTTP 403 with its JSON error body."""

    def _forbid(self) -> None:
        body = json.dumps({"error": {"code": 403, "message": "test@example.com does not have storage.objects.create "
                           "access to the Google Cloud Storage object."}}).encode()  # fmt: skip
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _forbid

    def log_message(self, *args) -> None:
        pass


def test_no_permission_is_refused_before_training(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        env = {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        line = refused(run(train_command("gs://locked-bucket/run", tmp_path), env))
    finally:
        server.shutdown()
    assert line.startswith("train.py: error: workdir=gs://locked-bucket/run: no permission to write to "), line
    assert "does not have storage.objects.create access" in line and "roles/storage.objectUser" in line


@pytest.mark.slow
def test_the_network_gone_mid_run_fails_naming_the_step_and_the_rerun_resumes_bitwise(gcs, finished, tmp_path_factory):
    """Its own server, stopped after the step-5 checkpoint (the objects stay on disk) and started again."""
    with LocalGCS(tmp_path_factory.mktemp("outage")) as server:
        bucket = server.create_bucket(BUCKET)
        workdir, cache = f"{bucket}/run", tmp_path_factory.mktemp("cache")
        command = [sys.executable, *train_command(workdir, cache)]
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **server.env()}, stderr=subprocess.PIPE)
        wait_for(lambda: stored(server, f"{workdir}/checkpoints/5/commit_success.txt").is_file(), process, "step 5")
        # The server keeps the marker before it answers the write: give the answer time to arrive (steps take
        # ~0.2 s, so the run is still short of step 10), or step 5's own save is what the outage interrupts.
        time.sleep(0.3)
        server.stop()
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 1, stderr[-3000:]
        line = stderr.decode().strip().splitlines()[-1]
        failed = f"train.py: error: storing the metrics in {workdir} before the checkpoint of step 10 failed"
        assert line.startswith(failed), line
        assert "run the same command again" in line

        server.start()
        assert committed_steps(server, workdir) == [5]  # the last checkpoint before the outage is whole
        result = run(command[1:], server.env())
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"resuming at step 5 from {workdir}/checkpoints/5" in result.stdout
        assert trajectory(server, workdir) == trajectory(gcs, finished)


PUT_SCRIPT = "import gcsfs, sys; gcsfs.GCSFileSystem().put(sys.argv[1], sys.argv[2], recursive=True)"


@pytest.mark.slow
def test_text_files_on_gcs_are_a_training_source(gcs, bucket, tmp_path):
    from diffjax.data import corpus

    local = tmp_path / "texts"
    local.mkdir()
    for number, (_, text) in zip(range(24), corpus.python_doc_items("train"), strict=False):
        (local / f"doc{number:02d}.txt").write_text(text)
    uploaded = run(["-c", PUT_SCRIPT, str(local), f"{bucket}/texts"], gcs.env())
    assert uploaded.returncode == 0, uploaded.stderr[-2000:]
    source = ["--config.data.source=text_files", f"--config.data.files={bucket}/texts/*.txt", "--config.total_steps=2"]
    command = ["train.py", f"--config.workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'data'}"]
    result = run([*command, *RUN, *source, "--config.data.validation_fraction=0.2"], gcs.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: validation loss" in result.stdout
    built = list((tmp_path / "data" / "text_files").iterdir())
    assert len(built) == 1 and built[0].name.startswith("files_")  # one dataset, fingerprinted by the objects
