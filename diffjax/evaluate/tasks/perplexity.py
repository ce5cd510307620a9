"""Loss, perplexity and forward throughput over a data split, and the cumulative average NLL by position.

The loss is the training loop's (mean next-token cross entropy over the tokens `loss_mask` keeps), so
`--batches` equal to the config's `eval_batches` on the validation split reproduces the run's eval loss.
Positions are per document (packed rows restart them), as in the paper's long-context figure.
"""

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from diffjax.data.pipeline import Batch, eval_batches
from diffjax.evaluate import plots
from diffjax.evaluate.tasks.base import EvalContext, TaskResult

FIGURE = "perplexity_by_position.png"


@functools.partial(jax.jit, static_argnums=0)
def token_nll(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch) -> jax.Array:
    """`[B, T]` next-token negative log-likelihood in nats, zero where `loss_mask` drops the token."""
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    return nll * batch["loss_mask"]


def cumulative_nll(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Average NLL of all tokens at positions <= p, for each p (NaN before the first token)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.cumsum(sums) / np.cumsum(counts)


def run(context: EvalContext) -> TaskResult:
    model, seq_len = context.model, context.config.seq_len
    batches = eval_batches(context.config, context.tokenizer, context.options.split, context.options.batches)
    # Compiled ahead so that the timing leaves compilation out; the compiled call takes the dynamic arguments.
    compiled = token_nll.lower(model.graphdef, model.params, batches[0]).compile()
    loss_sum = count = seconds = 0.0
    sums, counts = np.zeros(seq_len), np.zeros(seq_len)
    for batch in tqdm(batches, desc=f"perplexity ({context.options.split})", unit="batch"):
        start = time.perf_counter()
        nll = np.asarray(jax.block_until_ready(compiled(model.params, batch)))
        seconds += time.perf_counter() - start
        kept = batch["loss_mask"] > 0
        loss_sum += float(nll[kept].sum())
        count += float(kept.sum())
        sums += np.bincount(batch["positions"][kept], weights=nll[kept], minlength=seq_len)[:seq_len]
        counts += np.bincount(batch["positions"][kept], minlength=seq_len)[:seq_len]
    loss = loss_sum / max(count, 1.0)
    tokens = sum(batch["inputs"].size for batch in batches)
    cumulative = cumulative_nll(sums, counts)
    figures = {
        "split": context.options.split,
        "batches": len(batches),
        "tokens": int(count),
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens_per_s": tokens / seconds,
        "cumulative_nll_by_position": [None if math.isnan(x) else float(x) for x in cumulative],
        "figure": _plot(context, cumulative, sums / np.maximum(counts, 1), counts),
    }
    summary = {
        "loss": f"{loss:.4f}",
        "perplexity": f"{math.exp(loss):.3f}",
        "tokens_per_s": f"{figures['tokens_per_s']:,.0f}",
        "tokens": f"{int(count):,} ({len(batches)} batches, {context.options.split})",
    }
    return TaskResult(figures, summary)


def _plot(context: EvalContext, cumulative: np.ndarray, per_position: np.ndarray, counts: np.ndarray) -> str:
    figure = plots.new_figure()
    axes = figure.add_subplot()
    seen = counts > 0
    positions = np.arange(len(counts))[seen]
    axes.plot(positions, per_position[seen], color="0.75", linewidth=0.8, label="NLL at position")
    axes.plot(positions, cumulative[seen], color="C0", linewidth=2, label="cumulative average NLL")
    axes.set_xlabel("position in document (tokens)")
    axes.set_ylabel("negative log-likelihood (nats/token)")
    axes.set_title(context.title(f"Cumulative average NLL by position ({context.options.split} split)"))
    axes.grid(alpha=0.3)
    axes.legend()
    return plots.save(figure, context.out / FIGURE)
