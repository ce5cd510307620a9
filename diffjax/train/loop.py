"""The training run: build everything from a validated config, train, evaluate, print a sample."""

from pathlib import Path

import jax
import ml_collections
import numpy as np

from diffjax.config import ConfigError, check_tokenizer, model_config, validate
from diffjax.data.pipeline import Batch, eval_batches, make_dataset
from diffjax.data.tokenizer import load_tokenizer
from diffjax.evaluate.generate import greedy_generate
from diffjax.parallel.mesh import initialize_distributed, make_mesh
from diffjax.train.flops import peak_tflops, training_flops_per_token
from diffjax.train.metrics import MetricsWriter, ProgressLog
from diffjax.train.optimizer import learning_rate_schedule
from diffjax.train.state import Trainer, create_state, global_batch, make_trainer


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
    """Train `config`; returns the first and last validation losses."""
    validate(config)
    initialize_distributed(**config.distributed)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(config.compilation_cache_dir).expanduser()))
    mesh = make_mesh(config.mesh.shape, config.mesh.dcn_shape)
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_tokenizer(config, tokenizer)
    validation = eval_batches(config, tokenizer)  # builds the dataset on first use; fails before the workdir
    workdir = Path(config.workdir)  # created only once the config and data are known to work
    workdir.mkdir(parents=True, exist_ok=True)
    main_process = jax.process_index() == 0
    if main_process:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    log = print if main_process else (lambda *_: None)

    trainer = make_trainer(config, mesh)
    state = create_state(config, trainer)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(
        f"model: {num_params / 1e6:.2f}M parameters, {config.model.attention_type} attention, "
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, workdir {workdir}"
    )
    train_batches = iter(make_dataset(config, tokenizer, "train"))
    try:
        return _train(config, trainer, state, train_batches, validation, tokenizer, workdir, log)
    finally:
        train_batches.close()


def _train(config, trainer: Trainer, state, train_batches, validation: list[Batch], tokenizer, workdir: Path, log):
    """Compile, evaluate at step 0, train, evaluate at the end, print a sample."""
    first = global_batch(next(train_batches), trainer.batch_sharding)
    compiled = trainer.train_step.lower(state, first).compile()
    log(describe_compiled(compiled))

    writer = MetricsWriter(workdir)
    schedule = learning_rate_schedule(config)
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_step = training_flops_per_token(model_config(config), config.seq_len) * tokens_per_step
    peak = peak_tflops(jax.devices()[0], config.cpu_peak_tflops)
    progress = ProgressLog(config, tokens_per_step, flops_per_step, peak, schedule, writer)

    def run_eval(step: int, params) -> float:
        loss = evaluate(trainer, params, validation)
        writer.write("eval", step, {"eval_loss": loss})
        log(f"step {step}: validation loss {loss:.4f}")
        return loss

    first_eval = run_eval(0, state.params)
    progress.restart_clock(0)
    try:
        state = train_loop(config, trainer, compiled, state, first, train_batches, progress, run_eval, workdir)
    finally:
        progress.close()

    last_eval = run_eval(config.total_steps, state.params)
    log(f"validation loss {first_eval:.4f} at step 0 -> {last_eval:.4f} at step {config.total_steps}")
    if config.sample_tokens and jax.process_count() == 1:
        prompt = tokenizer.encode(config.sample_prompt)
        generated = greedy_generate(trainer.options.graphdef, state.params, prompt, config.sample_tokens)
        log(f"sample: {config.sample_prompt + tokenizer.decode(generated)!r}")
    writer.close()
    return {"first_eval_loss": first_eval, "last_eval_loss": last_eval}


def train_loop(config, trainer, compiled, state, batch, train_batches, progress, run_eval, workdir):
    """Steps 1..total_steps; metrics of step t are read after step t+1 is dispatched."""
    profile_start = config.profile_start_step if config.profile_start_step > 0 else None
    profile_stop = profile_start and profile_start + config.profile_steps - 1
    previous = None

    def settle(step: int, metrics: dict[str, jax.Array]) -> None:
        """A finished step's host-side work: the NaN check and logging."""
        check_finite(config, step, metrics)
        progress.step_done(step, metrics)

    for step in range(1, config.total_steps + 1):
        if step == profile_start:
            jax.profiler.start_trace(str(workdir / "profile"))
        state, metrics = compiled(state, batch)
        if step == profile_stop:
            jax.block_until_ready(metrics)
            jax.profiler.stop_trace()
        if previous is not None:
            settle(*previous)
        previous = (step, metrics)
        if step < config.total_steps:
            batch = global_batch(next(train_batches), trainer.batch_sharding)
        if config.eval_every_steps and step % config.eval_every_steps == 0 and step < config.total_steps:
            settle(*previous)
            previous = None
            run_eval(step, state.params)
            progress.restart_clock(step)
    settle(*previous)
    return state


def check_finite(config: ml_collections.ConfigDict, step: int, metrics: dict[str, jax.Array]) -> None:
    """Stop on a non-finite step under nan_policy=stop; the update was already withheld in the step."""
    if config.nan_policy == "stop" and not bool(np.asarray(metrics["finite"])):
        raise NonFiniteError(
            f"step {step}: loss {float(metrics['loss'])} / gradient norm {float(metrics['grad_norm'])} is not finite; "
            "the update was not applied (lower learning_rate, or set nan_policy=skip)"
        )
