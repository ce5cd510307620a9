"""The training run: build everything from a validated config, resume or start, train, evaluate, sample."""

import dataclasses
import os
import time
from collections.abc import Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np
from etils import epath

from diffjax import files
from diffjax.config import ConfigError, check_tokenizer, model_config, validate
from diffjax.data.pipeline import Batch, eval_batches, make_dataset
from diffjax.data.tokenizer import load_tokenizer
from diffjax.evaluate.generate import encode_prompt, generate
from diffjax.model import parameter_count
from diffjax.parallel.mesh import initialize_distributed, make_mesh
from diffjax.train.checkpoint import RunCheckpoints, find_checkpoint, restore_params, run_metadata
from diffjax.train.flops import peak_tflops, training_flops_per_token
from diffjax.train.metrics import MetricsWriter, ProgressLog, duration, say
from diffjax.train.optimizer import learning_rate_schedule, warmup_note
from diffjax.train.preemption import StopRequest
from diffjax.train.state import Trainer, create_state, global_batch, make_trainer, state_from_params
from diffjax.train.step import TrainState


class NonFiniteError(ConfigError):
    """The loss or gradient became NaN/Inf (the state keeps the last finite update)."""


def evaluate(trainer: Trainer, params, batches: list[Batch]) -> float:
    """Mean validation loss per kept token over all `batches`."""
    totals = [trainer.eval_step(params, global_batch(b, trainer.batch_sharding)) for b in batches]
    loss_sum, count = (sum(float(t[i]) for t in totals) for i in range(2))
    return loss_sum / max(count, 1.0)


def describe_compiled(compiled: jax.stages.Compiled) -> str:
    """Per-device memory of the compiled train step, as XLA planned it."""
    memory = compiled.memory_analysis()
    if memory is None:
        return "memory analysis unavailable"
    gib = 2.0**30
    return (
        f"train step per device: arguments {memory.argument_size_in_bytes / gib:.3f} GiB, "
        f"temporaries {memory.temp_size_in_bytes / gib:.3f} GiB, outputs {memory.output_size_in_bytes / gib:.3f} GiB"
    )


def run(config: ml_collections.ConfigDict) -> dict[str, float]:
    """Train `config`, resuming from `<workdir>/checkpoints` when it holds any; returns validation losses.

    The result has `last_eval_loss` (absent when a stop signal ended the run early) and, for a run
    that started at step 0, `first_eval_loss`.
    """
    started = time.perf_counter()
    validate(config)
    initialize_distributed(**config.distributed)
    check_storage(config)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.fspath(files.path(config.compilation_cache_dir)))
    mesh = make_mesh(config.mesh.shape, config.mesh.dcn_shape)
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_tokenizer(config, tokenizer)
    validation = eval_batches(config, tokenizer)  # builds the dataset on first use; fails before the workdir
    trainer = make_trainer(config, mesh)
    init_from = find_checkpoint(config.init_from, trainer.abstract_state.params) if config.init_from else None
    workdir = files.path(config.workdir)
    main_process = jax.process_index() == 0
    log = say if main_process else (lambda *_: None)

    train_batches = iter(make_dataset(config, tokenizer, "train"))
    checkpoints = None
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoints = RunCheckpoints(workdir, config, run_metadata(config, mesh))
        state = checkpoints.restore_latest(trainer.abstract_state, train_batches)
        if state is not None:
            log(f"resuming at step {int(state.step)} from {checkpoints.step_directory(int(state.step))}")
        elif init_from:
            log(f"parameters from {init_from[0] / str(init_from[1])}; optimizer and step start afresh")
            state = state_from_params(trainer, restore_params(*init_from, trainer.abstract_state.params))
        else:
            state = create_state(config, trainer)
        if main_process:
            files.write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2))
        num_params = parameter_count(state.params, model_config(config))
        log(
            f"model: {num_params / 1e6:.2f}M parameters, {config.model.attention_type} attention, "
            f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, workdir {workdir}"
        )
        if note := warmup_note(config):
            log(note)
        session = _Session.start(config, trainer, checkpoints, validation, workdir, log, int(state.step), started)
        return session.run(state, train_batches, tokenizer)
    finally:
        if checkpoints is not None:
            checkpoints.close()  # waits for the last asynchronous write
        train_batches.close()


@dataclasses.dataclass
class _Session:
    """What the steps of one invocation share: validation data, metrics and checkpoints."""

    config: ml_collections.ConfigDict
    trainer: Trainer
    checkpoints: RunCheckpoints
    validation: list[Batch]
    writer: MetricsWriter
    progress: ProgressLog
    log: Callable[..., None]
    start_step: int
    started: float  # perf_counter() when the command began

    @classmethod
    def start(
        cls, config, trainer, checkpoints, validation, workdir: epath.Path, log, start_step: int, started: float
    ) -> "_Session":
        writer = MetricsWriter(workdir, resume_step=start_step or None)
        tokens_per_step = config.batch_size * config.seq_len
        flops_per_step = training_flops_per_token(model_config(config), config.seq_len) * tokens_per_step
        peak = peak_tflops(jax.devices()[0], config.cpu_peak_tflops)
        schedule = learning_rate_schedule(config)
        progress = ProgressLog(config, tokens_per_step, flops_per_step, peak, schedule, writer, start_step)
        return cls(config, trainer, checkpoints, validation, writer, progress, log, start_step, started)

    def evaluate(self, step: int, params) -> float:
        loss = evaluate(self.trainer, params, self.validation)
        self.writer.write("eval", step, {"eval_loss": loss})
        self.log(f"step {step}: validation loss {loss:.4f}")
        return loss

    def run(self, state: TrainState, train_batches: grain.DatasetIterator, tokenizer) -> dict[str, float]:
        """Evaluate at step 0 (not on resume), train to `total_steps` or a stop signal, evaluate, sample."""
        config, result = self.config, {}
        try:
            with StopRequest().installed() as stop:
                if self.start_step == 0:
                    result["first_eval_loss"] = self.evaluate(0, state.params)
                state, stopped = self.train(state, train_batches, stop)
        finally:
            self.progress.close()
        try:
            if stopped is not None:
                self.checkpoints.wait()
                self.log(f"saved step {stopped} to {self.checkpoints.step_directory(stopped)}; run again to resume")
                self.summarize(stopped)
                return result
            result["last_eval_loss"] = self.evaluate(max(config.total_steps, self.start_step), state.params)
            if config.sample_tokens and jax.process_count() == 1:
                prompt = encode_prompt(tokenizer, config.sample_prompt)
                generated = generate(self.trainer.options.graphdef, state.params, prompt, config.sample_tokens)
                self.log(f"sample: {config.sample_prompt + tokenizer.decode(generated.tokens)!r}")
            self.checkpoints.wait()
            self.summarize(max(config.total_steps, self.start_step))
            return result
        finally:
            self.writer.close()

    def summarize(self, step: int) -> None:
        """The closing lines: losses first -> last over the whole run (resumes included), wall time and
        tokens/s of this invocation, and where the checkpoint and the metrics are."""
        workdir = files.path(self.config.workdir)
        lines = [f"done at step {step} of {self.config.total_steps}: {duration(time.perf_counter() - self.started)}"]
        if self.progress.tokens_per_s:
            lines[0] += f" for {self.progress.trained_steps} steps, {self.progress.tokens_per_s:,.0f} tokens/s"
        for name, key, what in [("eval", "eval_loss", "validation"), ("metrics", "loss", "training")]:
            if ends := self.writer.ends(name, key):
                (first_step, first), (last_step, last) = ends
                lines.append(f"{what} loss {first:.4f} at step {first_step} -> {last:.4f} at step {last_step}")
        lines.append(f"checkpoint: {self.checkpoints.step_directory(step)}")
        lines.append(f"metrics: {workdir / 'metrics.jsonl'}, {workdir / 'eval.jsonl'}, {workdir / 'tensorboard'}")
        self.log("\n".join(lines))

    def train(self, state: TrainState, train_batches: Iterator, stop: StopRequest) -> tuple[TrainState, int | None]:
        """Steps after `start_step` up to `total_steps`; returns the state and the step a signal stopped at.

        Metrics of step t are read after step t+1 is dispatched. A checkpoint of step t holds the data
        position after exactly t batches, so the next batch is drawn only once the save has begun.
        """
        config, trainer = self.config, self.trainer
        if self.start_step >= config.total_steps:
            return state, None
        batch = global_batch(next(train_batches), trainer.batch_sharding)
        compiled = trainer.train_step.lower(state, batch).compile()
        self.log(describe_compiled(compiled))
        profile_start = config.profile_start_step if config.profile_start_step > 0 else None
        profile_stop = profile_start and profile_start + config.profile_steps - 1
        self.progress.restart_clock(self.start_step)
        previous = None
        for step in range(self.start_step + 1, config.total_steps + 1):
            if step == profile_start:
                jax.profiler.start_trace(os.fspath(files.path(config.workdir) / "profile"))
            state, metrics = compiled(state, batch)
            if step == profile_stop:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
            if previous is not None:
                self.settle(*previous)
            previous = (step, metrics)
            stopping = stop.reached(step)
            if stopping or step == config.total_steps or self.checkpoints.due(step):
                self.settle(*previous)  # never checkpoint past a step that fails the NaN check
                previous = None
                self.writer.flush(f"before the checkpoint of step {step}")  # stored before it can complete
                self.checkpoints.save(step, state, train_batches)
            if stopping:
                return state, step
            if step < config.total_steps:
                batch = global_batch(next(train_batches), trainer.batch_sharding)
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step < config.total_steps:
                if previous is not None:
                    self.settle(*previous)
                    previous = None
                self.evaluate(step, state.params)
                self.progress.restart_clock(step)
        return state, None

    def settle(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """A finished step's host-side work: the NaN check and logging."""
        check_finite(self.config, step, metrics)
        self.progress.step_done(step, metrics)


def check_storage(config: ml_collections.ConfigDict) -> None:
    """Every gs:// path of `config` usable before anything is built: one line naming the setting otherwise."""
    files.check_access(config.workdir, "workdir", write=True)
    if config.init_from:
        files.check_access(config.init_from, "init_from")
    if config.compilation_cache_dir:
        files.check_access(config.compilation_cache_dir, "compilation_cache_dir", write=True)
    if config.data.tokenizer != "byte":
        files.check_access(config.data.tokenizer, "data.tokenizer")
    files.check_access(config.data.data_dir, "data.data_dir")  # often a shared, read-only bucket
    for pattern in filter(None, (p.strip() for p in config.data.files.split(","))):
        files.check_access(pattern, "data.files")


def check_finite(config: ml_collections.ConfigDict, step: int, metrics: dict[str, jax.Array]) -> None:
    """Stop on a non-finite step under nan_policy=stop; the update was already withheld in the step."""
    if config.nan_policy == "stop" and not bool(np.asarray(metrics["finite"])):
        raise NonFiniteError(
            f"step {step}: loss {float(metrics['loss'])} / gradient norm {float(metrics['grad_norm'])} is not finite; "
            "the update was not applied (lower learning_rate, or set nan_policy=skip)"
        )
