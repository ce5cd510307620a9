"""Real TPU compilation through libtpu topologies (no TPU needed); skipped where libtpu is absent."""

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO, load_config

from diffjax.train.aot import compile_for_topology

requires_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install -e ".[tpu]")'
)


@requires_libtpu
def test_tiny_config_compiles_for_a_v5e_slice():
    config = load_config(REPO / "configs" / "tiny.py")
    config.aot_topology = "v5e:2x2"
    report = compile_for_topology(config)
    assert report["devices"] == 4 and "v5" in report["device_kind"]
    assert 0 < report["bytes_per_device"] < report["hbm_bytes_per_device"]
    assert report["model_flops_per_device"] > 0


@pytest.mark.slow
@requires_libtpu
def test_a_paper_config_compiles_sharded_over_fsdp_and_tensor():
    config = load_config(REPO / "configs" / "paper_830m.py")
    config.update(aot_topology="v5e:2x2", batch_size=8)
    config.mesh.shape = (1, 2, 2)
    report = compile_for_topology(config)
    assert report["mesh"] == str({"data": 1, "fsdp": 2, "tensor": 2})
    # bf16 compute, f32 params + Adam moments: 12 bytes x 834M parameters over 4 chips is 2.3 GiB per chip.
    assert 2.0 * 2**30 < report["bytes_per_device"] < report["hbm_bytes_per_device"]


@requires_libtpu
def test_train_cli_compiles_ahead_of_time_and_exits():
    result = subprocess.run(
        [sys.executable, "train.py", "--config.aot_topology=v5e:2x2", "--config.workdir=/nonexistent/never"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "v5e:2x2 (4 x TPU v5 lite)" in result.stdout and "fits" in result.stdout


def test_a_missing_topology_is_a_one_line_error():
    result = subprocess.run(
        [sys.executable, "train.py", "--config.aot_topology=v9z:1x1"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: aot_topology='v9z:1x1'")


@requires_libtpu
def test_multi_slice_meshes_put_dcn_axes_across_slices():
    from diffjax.parallel.mesh import make_mesh
    from diffjax.train.aot import topology_devices

    mesh = make_mesh((1, -1, 1), dcn_shape=(2, 1, 1), devices=topology_devices("v5e:2x2", num_slices=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
