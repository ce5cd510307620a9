"""Checkpoint save/restore throughput: Orbax the way training writes, to the local disk and to Cloud Storage.

The tree is a paper model's parameters (`configs/paper_830m.py` unless `--config` names another), with
fewer layers if asked, filled with random values (zeros could compress) on one CPU device, and with
`--opt_state` AdamW's state as well. Each storage gets an `ocp.CheckpointManager` with the handlers
training registers (`diffjax.train.checkpoint`): an asynchronous `StandardSave` timed until
`wait_until_finished()` returns (and, separately, until `save()` itself returns: the part that stalls a
train step), then a `StandardRestore` into the abstract tree (shapes, dtypes, the device's sharding),
checked bit for bit against what was saved. Every repeat writes a new step, deleted after its check.

`local` is a temporary directory; `gcs` is the Cloud Storage emulator (`diffjax.gcs_emulator`, a
fake-gcs-server process on loopback keeping its objects on the same disk), so it measures what the gs://
path costs on the client (HTTP, tensorstore's GCS driver, gcsfs for the metadata), not Cloud Storage's
bandwidth. Restores read what was just written, so from the page cache in both cases.
"""

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from diffjax import gcs_emulator
from diffjax.cli import UsageError
from diffjax.config import load_config_file, model_config
from diffjax.evaluate.results import format_table
from diffjax.model import DiffTransformer
from diffjax.train.checkpoint import handler_registry
from diffjax.train.optimizer import make_optimizer

STORAGES = ("local", "gcs")
BUCKET = "diffjax-bench"
MB = 1e6


class RoundTripError(RuntimeError):
    """A restored array differs from the one saved."""


def check_arguments(layers: int, repeats: int, storages: list[str]) -> None:
    """`UsageError` (one line) for input the benchmark cannot run with."""
    if layers < 1:
        raise UsageError(f"--layers={layers} must be at least 1")
    if repeats < 1:
        raise UsageError(f"--repeats={repeats} must be at least 1")
    if not storages:
        raise UsageError(f"--storage names none of {', '.join(STORAGES)}")
    for name in storages:
        if name not in STORAGES:
            raise UsageError(f"--storage: unknown storage {name!r}; choose from {', '.join(STORAGES)}")
    if len(set(storages)) != len(storages):
        raise UsageError(f"--storage names a storage twice: {','.join(storages)}")
    if "gcs" in storages and not gcs_emulator.available():
        raise UsageError("--storage=gcs needs the Cloud Storage emulator from the test extra: pip install -e '.[test]'")


def abstract_tree(config: ml_collections.ConfigDict, layers: int, opt_state: bool) -> dict[str, Any]:
    """`{"params": ..., "opt_state": ...}` of `config`'s model with `layers` layers, as ShapeDtypeStructs
    (nothing allocated) on the first CPU device; `opt_state` only when asked."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_layers = layers
    params = nnx.state(nnx.eval_shape(lambda: DiffTransformer(model_config(config), rngs=nnx.Rngs(0))))
    tree = {"params": params}
    if opt_state:
        tree["opt_state"] = jax.eval_shape(make_optimizer(config).init, params)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def materialize(abstract: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Arrays of `abstract`'s shapes on its devices, random values (normal floats, any integers)."""
    rng = np.random.default_rng(seed)

    def fill(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        dtype = np.dtype(leaf.dtype)
        if np.issubdtype(dtype, np.integer):
            values = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, leaf.shape, dtype=dtype, endpoint=True)
        else:
            values = rng.standard_normal(leaf.shape, dtype=np.float32).astype(dtype)
        return jax.device_put(values, leaf.sharding)

    return jax.tree.map(fill, abstract)


def count(tree: Any) -> tuple[int, int]:
    """(elements, bytes) of the arrays in `tree`."""
    leaves = jax.tree.leaves(tree)
    return (
        sum(int(np.prod(x.shape)) for x in leaves),
        sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves),
    )


def check_equal(saved: Any, restored: Any) -> None:
    """`RoundTripError` naming the first array of `restored` whose structure, shape, dtype or bits differ."""
    saved_leaves, saved_structure = jax.tree_util.tree_flatten_with_path(saved)
    restored_leaves, restored_structure = jax.tree_util.tree_flatten_with_path(restored)
    if saved_structure != restored_structure:
        raise RoundTripError(f"the restored tree differs in structure: {restored_structure} != {saved_structure}")
    for (path, a), (_, b) in zip(saved_leaves, restored_leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(_bits(a), _bits(b)):
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            raise RoundTripError(f"restored array {name} ({b.dtype}{list(b.shape)}) differs from the one saved")


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _manager(directory: epath.Path) -> ocp.CheckpointManager:
    """Training's handlers (`params`, `opt_state`, ...) and options, without its retention policy."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, create=True, cleanup_tmp_directories=False)
    return ocp.CheckpointManager(directory, options=options, handler_registry=handler_registry())


def stored_bytes(directory: epath.Path) -> int:
    """Bytes of the files under `directory` (compressed arrays and metadata, as stored)."""
    return sum(stored_bytes(path) if path.is_dir() else path.stat().length for path in directory.iterdir())


def round_trips(directory: epath.Path, tree: dict[str, Any], abstract: dict[str, Any], repeats: int):
    """Per repeat: seconds to `save` (until written), until `save()` returned (`blocked`) and to `restore`,
    and the bytes the checkpoint takes in storage (`stored`)."""
    figures = {"save": [], "blocked": [], "restore": [], "stored": []}
    with _manager(directory) as manager:
        for step in range(1, repeats + 1):
            started = time.perf_counter()
            manager.save(step, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in tree.items()}))
            returned = time.perf_counter()
            manager.wait_until_finished()
            written = time.perf_counter()
            restore_args = ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in abstract.items()})
            restored = manager.restore(step, args=restore_args)
            read = time.perf_counter()
            check_equal(tree, {key: restored[key] for key in tree})
            del restored
            figures["stored"].append(stored_bytes(directory / str(step)))
            manager.delete(step)
            figures["save"].append(written - started)
            figures["blocked"].append(returned - started)
            figures["restore"].append(read - written)
    return figures


def _restore_environment(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def storage_directories(storages: list[str], scratch: Path) -> Iterator[dict[str, epath.Path]]:
    """A checkpoint directory per storage under `scratch`; for `gcs`, the emulator is started and this process
    pointed at it first (tensorstore reads its environment once, before its first request); the environment is
    put back on exit."""
    with contextlib.ExitStack() as stack:
        directories = {}
        for name in storages:
            if name == "local":
                directories[name] = epath.Path(scratch / "local" / "checkpoints")
            else:
                server = stack.enter_context(gcs_emulator.LocalGCS(scratch / "gcs"))
                stack.callback(_restore_environment, {key: os.environ.get(key) for key in server.env()})
                os.environ.update(server.env())
                directories[name] = epath.Path(server.create_bucket(BUCKET)) / "checkpoints"
        yield directories


def benchmark_checkpoint(
    config: ml_collections.ConfigDict, layers: int, repeats: int, storages: list[str], opt_state: bool
) -> dict[str, Any]:
    """`elements`, `bytes` and per storage the median `save_s`, `blocked_s`, `restore_s` and MB/s."""
    check_arguments(layers, repeats, storages)
    with (
        tempfile.TemporaryDirectory(prefix="diffjax-bench-checkpoint-") as scratch,
        storage_directories(storages, Path(scratch)) as directories,
    ):
        abstract = abstract_tree(config, layers, opt_state)
        tree = materialize(abstract)
        elements, size = count(tree)
        result: dict[str, Any] = {"elements": elements, "bytes": size}
        for name, directory in directories.items():
            figures = round_trips(directory, tree, abstract, repeats)
            medians = {kind: statistics.median(values) for kind, values in figures.items()}
            result[name] = {f"{kind}_s": value for kind, value in medians.items() if kind != "stored"}
            result[name]["stored_bytes"] = int(medians["stored"])
            result[name] |= {"save_mb_s": size / MB / medians["save"], "restore_mb_s": size / MB / medians["restore"]}
    return result


def load_default_config() -> ml_collections.ConfigDict:
    """`configs/paper_830m.py` of this source tree."""
    path = Path(__file__).resolve().parents[2] / "configs" / "paper_830m.py"
    if not path.is_file():
        raise UsageError(f"{path} not found; pass --config=<a paper config file>")
    return load_config_file(path)


def run(config: ml_collections.ConfigDict | None, layers: int, repeats: int, storages: list[str], opt_state: bool):
    """`python -m diffjax.bench checkpoint`: the figures as a table, then one line of `key=value` pairs."""
    check_arguments(layers, repeats, storages)
    config = config if config is not None else load_default_config()
    result = benchmark_checkpoint(config, layers, repeats, storages, opt_state)
    model = config.model
    items = "parameters and AdamW state" if opt_state else "parameters"
    print(
        f"checkpoint: E={model.emb_dim} layers={layers} (config: {model.num_layers}) H={model.num_heads} "
        f"mlp={model.mlp_dim} vocab={model.vocab_size} {model.param_dtype}, {items}: {result['elements']:,} values, "
        f"{result['bytes'] / MB:,.1f} MB; median of {repeats} round trips"
    )
    header = ["storage", "save s", "save MB/s", "restore s", "restore MB/s", "save() blocked s", "stored MB"]
    rows = []
    for name in storages:
        r = result[name]
        rows.append([name, f"{r['save_s']:.3f}", f"{r['save_mb_s']:,.1f}", f"{r['restore_s']:.3f}"])
        rows[-1] += [f"{r['restore_mb_s']:,.1f}", f"{r['blocked_s']:.3f}", f"{r['stored_bytes'] / MB:,.1f}"]
    print(format_table(header, rows))
    pairs = {f"{name}_{key}": result[name][key] for name in storages for key in ("save_mb_s", "restore_mb_s")}
    print(" ".join(f"{key}={value:.4g}" for key, value in pairs.items()) + f" bytes={result['bytes']}")
