"""Orbax checkpoints of a training run: exact resume, damage handling, parameters for fine-tuning.

`<workdir>/checkpoints/<step>/` holds four items: `params` and `opt_state` (tensorstore arrays, written
asynchronously and read straight into the target shardings, so any mesh or device count restores any
checkpoint), `data` (every process's grain iterator position, JSON) and `metadata` (the config,
the model layout and package versions, JSON). Nothing is pickled, so loading never runs stored code.
The train step draws no random numbers (no dropout), so the data position is the run's only RNG state.

A workdir on Cloud Storage (`gs://...`) is written straight through tensorstore's GCS driver. There a step
is complete once Orbax has written its `commit_success.txt` (an object store cannot rename a directory),
so a step directory without one is an unfinished write.
"""

import contextlib
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx, traverse_util

from diffjax import files
from diffjax.cli import RunFailure
from diffjax.config import ConfigError
from diffjax.model import VOCAB_AXES
from diffjax.parallel.mesh import barrier
from diffjax.train.step import TrainState

CHECKPOINTS = "checkpoints"
DAMAGED = "checkpoints.damaged"  # unreadable steps are moved here once an older one has restored
UNFINISHED = ".orbax-checkpoint-tmp"  # locally Orbax writes a step here and renames it when complete
COMMITTED = "commit_success.txt"  # on Cloud Storage Orbax writes this last into a complete step
PACKAGES = ("diffjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")


def warn(message: str) -> None:
    """A warning on stderr from process 0 (absl keeps library logging quiet in the CLIs)."""
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _tuples(state: Any) -> Any:
    """JSON brings tuples back as lists; grain's iterator states hold tuples and compare against them."""
    if isinstance(state, dict):
        return {key: _tuples(value) for key, value in state.items()}
    if isinstance(state, list):
        return tuple(_tuples(value) for value in state)
    return state


class _DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's handler (one JSON file per process), restoring the tuples its JSON round trip loses.

    grain 0.2.18's concat-then-split packer tests `slice != (-1, -1)`, which a list never equals, so its
    own restore silently resumes at another position inside a shuffle window.
    """

    def restore(self, directory, item=None, args=None) -> grain.DatasetIterator:
        iterator = item or args.item
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        iterator.set_state(_tuples(json.loads(path.read_text())))
        return iterator


def handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Handlers by item name, so metadata and partial restores work before anything was saved."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ("params", "opt_state"):
        registry.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler())
        registry.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
    registry.add("metadata", ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    registry.add("metadata", ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
    registry.add("data", grain.checkpoint.CheckpointSave, _DataHandler())
    registry.add("data", grain.checkpoint.CheckpointRestore, _DataHandler())
    return registry


def _manager(directory: epath.Path, options: ocp.CheckpointManagerOptions | None = None) -> ocp.CheckpointManager:
    options = options or ocp.CheckpointManagerOptions(create=False)  # a reader: never creates the directory
    return ocp.CheckpointManager(files.absolute(directory), options=options, handler_registry=handler_registry())


def run_metadata(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (JSON)."""
    return {
        "config": config.to_dict(),
        "model_layout": {"layers": "scan-stacked", "num_layers": config.model.num_layers, "params": "flax-nnx"},
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "mesh": dict(mesh.shape),
        "versions": {"python": platform.python_version()} | {p: installed_version(p) for p in PACKAGES},
    }


def installed_version(distribution: str) -> str:
    """`distribution`'s installed version; "not installed" for diffjax imported from a source tree (PYTHONPATH)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def flat_leaves(tree) -> dict[str, Any]:
    """`{"blocks/attn/q_proj/kernel": leaf}` of a parameter tree (nnx Variables or Orbax metadata)."""
    nested = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    flat = traverse_util.flatten_dict(nested)
    names = ("/".join(map(str, key[:-1] if key[-1] == "value" else key)) for key in flat)
    return dict(zip(names, flat.values(), strict=True))


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    return {name: tuple(leaf.shape) for name, leaf in flat_leaves(tree).items()}


def check_shapes(saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]], where: str) -> None:
    """One line naming the first parameter whose shape (or presence) differs between checkpoint and config."""
    for name in sorted(saved.keys() | wanted.keys()):
        if saved.get(name) != wanted.get(name):
            there = saved.get(name, "absent")
            here = wanted.get(name, "absent")
            padding = ""
            if name in VOCAB_AXES:
                padding = " (runs saved before vocabulary padding need model.vocab_multiple=1)"
            raise ConfigError(
                f"the checkpoint {where} does not fit this config: parameter {name} is {there} there and {here} "
                "here; use the model settings it was trained with (its metadata holds the config) or another "
                f"workdir{padding}"
            )


class RunCheckpoints:
    """The checkpoints of one workdir: periodic asynchronous saves, retention, resume."""

    def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict, metadata: dict[str, Any]):
        self.directory = workdir / CHECKPOINTS
        self.damaged = workdir / DAMAGED
        self.every = config.checkpoint_every_steps
        self.restart_from_scratch = config.restart_from_scratch
        self.metadata = metadata
        keep: ocp.checkpoint_managers.PreservationPolicy = ocp.checkpoint_managers.LatestN(config.keep_checkpoints)
        if config.keep_period:
            keep = ocp.checkpoint_managers.AnyPreservationPolicy(
                [keep, ocp.checkpoint_managers.EveryNSteps(config.keep_period)]
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=False
        )
        self.manager = _manager(self.directory, options)
        self.writing: int | None = None  # the step of the asynchronous write in flight

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, state: TrainState, data_iterator: grain.DatasetIterator) -> None:
        """Start writing `step`; the call returns once the arrays are copied off the devices."""
        if step in self.manager.all_steps():
            return  # already saved (a preemption at a periodic step, or a re-run of a finished run)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            metadata=ocp.args.JsonSave(self.metadata | {"step": step, "saved_at": time.time()}),
        )
        with self._failures():
            self.manager.check_for_errors()  # the previous write's failure, named as that step's
        self.writing = step
        with self._failures():
            self.manager.save(step, args=args, force=True)

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """A failed write (the storage unreachable, say) as one line naming the step; Orbax reports an
        asynchronous failure at the next save or wait, and never marks that step complete."""
        try:
            yield
        except Exception as error:
            intact = max((s for s in self.manager.all_steps() if s != self.writing), default=None)
            step = self.writing
            self.writing = None
            kept = f"step {intact} is the latest complete checkpoint" if intact is not None else "no step is complete"
            raise RunFailure(
                f"saving the checkpoint of step {step} to {self.directory} failed ({_reason(error)}); {kept}: "
                "run the same command again once the storage is reachable to resume from it"
            ) from error

    def step_directory(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def restore_latest(self, abstract: TrainState, data_iterator: grain.DatasetIterator) -> TrainState | None:
        """The newest readable checkpoint restored into `abstract`'s shardings, or None when there is none.

        Unreadable newer steps are skipped with a warning, and moved to `checkpoints.damaged/` once an
        older one has restored (so later saves of those steps do not collide). A model that does not fit
        raises `ConfigError` before anything is read or moved.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            self._remove_unfinished()
            return None
        failed: list[int] = []
        for step in steps:
            try:
                state = self._restore(step, abstract, data_iterator)
            except ConfigError:
                raise
            except Exception as error:  # any read failure makes this step unusable
                warn(f"checkpoint {self.step_directory(step)} is unreadable ({_reason(error)}); trying an older one")
                failed.append(step)
                continue
            self._move_aside(failed)
            self._remove_unfinished()
            return state
        if not self.restart_from_scratch:
            raise ConfigError(
                f"no usable checkpoint in {self.directory} (unreadable steps: {', '.join(map(str, failed))}); "
                "repair or remove them, or set --config.restart_from_scratch=true to train from step 0"
            )
        warn(f"restart_from_scratch: moving the unreadable checkpoints to {self.damaged}, starting at step 0")
        self._move_aside(failed)
        self._remove_unfinished()
        return None

    def _restore(self, step: int, abstract: TrainState, data_iterator: grain.DatasetIterator) -> TrainState:
        saved = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
        if saved["process_count"] != jax.process_count():
            raise ConfigError(
                f"checkpoint {self.step_directory(step)} was written by {saved['process_count']} processes and this "
                f"run has {jax.process_count()}: the data position cannot be split differently; resume with "
                f"{saved['process_count']} processes, or start a new workdir with init_from={self.step_directory(step)}"
            )
        check_fits(self.manager, step, abstract.params)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                opt_state=ocp.args.StandardRestore(abstract.opt_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        step_array = jax.device_put(jnp.asarray(step, abstract.step.dtype), abstract.step.sharding)
        return TrainState(step_array, restored.params, restored.opt_state)

    def _remove_unfinished(self) -> None:
        """Delete writes that never completed (a kill mid-save); the step before them is intact."""
        if jax.process_index() == 0 and self.directory.is_dir():
            for path in unfinished_writes(self.directory):
                warn(f"removing the unfinished checkpoint write {path}")
                files.remove_tree(path)
        barrier("removed unfinished checkpoints")
        self.manager.reload()

    def _move_aside(self, steps: list[int]) -> None:
        if steps and jax.process_index() == 0:
            for step in steps:
                target = self.damaged / f"{step}-{int(time.time())}"
                files.move_tree(self.step_directory(step), target)
                warn(f"moved the unreadable checkpoint {self.step_directory(step)} to {target}")
        if steps:
            barrier("moved damaged checkpoints")
            self.manager.reload()

    def wait(self) -> None:
        """Block until the last write is complete on disk."""
        with self._failures():
            self.manager.wait_until_finished()
        self.writing = None

    def close(self) -> None:
        self.wait()
        self.manager.close()


def unfinished_writes(directory: epath.Path) -> list[epath.Path]:
    """Step writes that never completed: Orbax's temporaries locally, steps without `commit_success.txt`
    on Cloud Storage."""
    if files.is_remote(directory):
        steps = [p for p in directory.iterdir() if p.name.isdigit()]
        return sorted(p for p in steps if not (p / COMMITTED).exists())
    return sorted(directory.glob(f"*{UNFINISHED}*"))


def _reason(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def find_checkpoint(path: str | epath.Path, abstract_params: nnx.State | None = None) -> tuple[epath.Path, int]:
    """(checkpoints directory, step) for a workdir, its `checkpoints/` or one step's directory.

    With `abstract_params`, also check that the model fits (before a run writes anything).
    """
    path = files.path(path)
    if path.name.isdigit() and (path / "params").is_dir():
        directory, step = path.parent, int(path.name)
    else:
        directory = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
        step = _manager(directory).latest_step() if directory.is_dir() else None
    if step is None:
        raise ConfigError(
            f"no checkpoint at {path}; give a workdir, its checkpoints/ directory or one step's directory"
        )
    if abstract_params is not None:
        check_fits(_manager(directory), step, abstract_params)
    return directory, step


def read_metadata(directory: epath.Path, step: int) -> dict[str, Any]:
    """The `metadata` item of one checkpoint (config, layout, versions)."""
    return _manager(directory).restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata


def check_fits(manager: ocp.CheckpointManager, step: int, abstract_params: nnx.State) -> None:
    """`ConfigError` naming the first parameter of `step` whose shape differs from `abstract_params`."""
    saved = _flat_shapes(manager.item_metadata(step)["params"].tree)
    check_shapes(saved, _flat_shapes(abstract_params), str(manager.directory / str(step)))


def restore_params(directory: epath.Path, step: int, abstract_params: nnx.State) -> nnx.State:
    """Parameters only (fine-tuning, evaluation), read into the shardings that `abstract_params` carries."""
    manager = _manager(directory)
    check_fits(manager, step, abstract_params)
    return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))).params


def save_params(workdir: epath.Path, step: int, params: nnx.State, metadata: dict[str, Any]) -> epath.Path:
    """A checkpoint of parameters and metadata only (imported weights): what `init_from` and `load_model` read.

    It holds no optimizer state or data position, so a run cannot resume in this workdir: fine-tune into
    another one with `init_from` pointing here.
    """
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with _manager(workdir / CHECKPOINTS, options) as manager:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            metadata=ocp.args.JsonSave(metadata | {"step": step, "saved_at": time.time()}),
        )
        manager.save(step, args=args, force=True)
    return workdir / CHECKPOINTS / str(step)
