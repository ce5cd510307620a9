import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

SCRIPT = REPO / "tests" / "parallel" / "sharded_run.py"


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "results.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


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
