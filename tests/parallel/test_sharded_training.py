import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SHORT_RUN, free_port

SCRIPT = REPO / "tests" / "parallel" / "sharded_run.py"
pytestmark = pytest.mark.xdist_group("sharded")  # one test process computes `sharded_results`, once


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "results.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["(8, 1, 1)", "(2, 2, 2)", "(1, 4, 2)"])
def test_meshes_give_the_single_device_losses(sharded_results, mesh):
    single = np.array(sharded_results["(1, 1, 1)"]["losses"])
    sharded = np.array(sharded_results[mesh]["losses"])
    assert len(sharded) == 5
    np.testing.assert_allclose(sharded, single, rtol=1e-4)


def test_parameters_are_sharded_as_the_rules_say(sharded_results):
    specs = sharded_results["(2, 2, 2)"]["shardings"]

    def spec(name):
        return next(value for key, value in specs.items() if name in key)

    assert spec("['q_proj']['kernel']") == "P(None, 'fsdp', 'tensor')"  # layers, embed, heads
    assert spec("['o_proj']['kernel']") == "P(None, 'tensor', 'fsdp')"
    assert spec("['down_proj']['kernel']") == "P(None, 'tensor', 'fsdp')"
    assert spec("['embed']['embedding']") == "P('tensor', 'fsdp')"  # vocab, embed
    assert spec("['lambda_q1']") == "P(None, None)"
    assert spec("['final_norm']['scale']") == "P(None,)"


@pytest.mark.slow
def test_two_processes_on_localhost_agree_with_one(sharded_results, tmp_path):
    """jax.distributed with gloo: 2 processes x 2 CPU devices, each feeding only its own rows of the batch."""
    out, port = tmp_path / "two.json", free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    workers = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out), str(i), str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [worker.communicate(timeout=600)[1] for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    losses = json.loads(out.read_text())["losses"]
    np.testing.assert_allclose(losses, sharded_results["(1, 1, 1)"]["losses"][:3], rtol=1e-4)


def _train(workdir, *flags: str) -> subprocess.CompletedProcess:
    """train.py on 8 XLA CPU devices."""
    return subprocess.run(
        [sys.executable, "train.py", f"--config.workdir={workdir}", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )


def test_the_default_model_trains_on_a_2x2x2_mesh(tmp_path):
    """The byte vocabulary's 259 ids are 384 embedding rows (model.vocab_multiple=128): they split over `tensor`."""
    flags = [flag for flag in SHORT_RUN if not flag.startswith("--config.total_steps")]
    result = _train(tmp_path / "run", "--config.mesh.shape=(2,2,2)", "--config.total_steps=2", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 cpu devices" in result.stdout
    assert "done at step 2 of 2" in result.stdout


def test_a_parameter_that_cannot_split_over_its_mesh_axes_is_a_one_line_error(tmp_path):
    result = _train(tmp_path / "run", "--config.mesh.shape=(2,2,2)", "--config.model.vocab_multiple=1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "train.py: error: parameter embed/embedding has a dimension of 259 that does not split 2 ways over mesh "
        "axes tensor; make model.vocab_multiple a multiple of 2, or change mesh.shape"
    )
    assert not (tmp_path / "run").exists()
