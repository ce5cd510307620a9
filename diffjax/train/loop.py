"""The training run: build everything from a validated config, train, evaluate, print a sample."""

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from tqdm import tqdm

from diffjax.config import check_tokenizer, model_config, validate
from diffjax.data.pipeline import Batch, eval_batches, make_dataset
from diffjax.data.tokenizer import load_tokenizer
from diffjax.evaluate.generate import greedy_generate
from diffjax.model import DiffTransformer
from diffjax.train.metrics import MetricsWriter
from diffjax.train.optimizer import learning_rate_schedule, make_optimizer
from diffjax.train.step import TrainState, eval_step, train_step


def evaluate(step_fn, params: nnx.State, batches: list[Batch]) -> float:
    """Mean validation loss per kept token over all `batches`."""
    totals = [step_fn(params, batch) for batch in batches]
    loss_sum, count = (sum(float(t[i]) for t in totals) for i in range(2))
    return loss_sum / max(count, 1.0)


def run(config: ml_collections.ConfigDict) -> dict[str, float]:
    """Train `config`; returns the first and last validation losses."""
    validate(config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_tokenizer(config, tokenizer)
    validation = eval_batches(config, tokenizer)  # builds the dataset on first use; fails before the workdir
    train_batches = iter(make_dataset(config, tokenizer, "train"))
    workdir = Path(config.workdir)  # created only once the config and data are known to work
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    log = print if jax.process_index() == 0 else (lambda *_: None)

    model = DiffTransformer(model_config(config), rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(model)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    log(f"model: {num_params / 1e6:.2f}M parameters, {config.model.attention_type} attention, workdir {workdir}")

    optimizer = make_optimizer(config)
    schedule = learning_rate_schedule(config)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef))
    writer = MetricsWriter(workdir)

    def run_eval(step: int) -> float:
        loss = evaluate(eval_fn, state.params, validation)
        writer.write("eval", step, {"eval_loss": loss})
        log(f"step {step}: validation loss {loss:.4f}")
        return loss

    first_eval = run_eval(0)
    tokens_per_step = config.batch_size * config.seq_len
    clock = (time.perf_counter(), 0)  # (time, step) at which the current throughput interval began
    bar = tqdm(total=config.total_steps, unit="step", disable=jax.process_index() != 0, dynamic_ncols=True)

    def flush(step: int, device_metrics: dict[str, jax.Array]) -> None:
        nonlocal clock
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        values["tokens_per_s"] = (step - clock[1]) * tokens_per_step / (now - clock[0])
        values["learning_rate"] = float(schedule(step - 1))
        clock = (now, step)
        writer.write("metrics", step, values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")

    pending = None  # a logged step's metrics, read only once the next step is dispatched
    for step in range(1, config.total_steps + 1):
        batch = next(train_batches)
        state, metrics = step_fn(state, batch)
        if pending is not None:
            flush(*pending)
            pending = None
        if step % config.log_every_steps == 0 or step == config.total_steps:
            pending = (step, metrics)
        elif step == 1:  # keep compilation out of the first throughput figure
            jax.block_until_ready(metrics)
            clock = (time.perf_counter(), 1)
        bar.update(1)
        if config.eval_every_steps and step % config.eval_every_steps == 0 and step < config.total_steps:
            if pending is not None:
                flush(*pending)
                pending = None
            run_eval(step)
            clock = (time.perf_counter(), step)
    if pending is not None:
        flush(*pending)
    bar.close()
    train_batches.close()

    last_eval = run_eval(config.total_steps)
    log(f"validation loss {first_eval:.4f} at step 0 -> {last_eval:.4f} at step {config.total_steps}")
    if config.sample_tokens:
        prompt = tokenizer.encode(config.sample_prompt)
        generated = greedy_generate(graphdef, state.params, prompt, config.sample_tokens)
        log(f"sample: {config.sample_prompt + tokenizer.decode(generated)!r}")
    writer.close()
    return {"first_eval_loss": first_eval, "last_eval_loss": last_eval}
