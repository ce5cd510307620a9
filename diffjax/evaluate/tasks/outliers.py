"""Activation outliers: the largest |attention logits| and |hidden states| against their median (the
paper's Table 5), over the tokens of a few batches of a split.

Attention logits are q k^T / sqrt(d) of every query head (both branches of DIFF) at every (query, key)
pair attention may see; hidden states are every layer's output (the residual stream) at every real token.
"top-k" is the k-th largest magnitude. The top values are exact; the median (the lower one, for an even
count) comes from a histogram on log-spaced bins 1.16% wide, so it is exact to within 0.6% whatever the
number of values: only 100 values and the bin counts per layer leave the device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from diffjax.data.pipeline import Batch, eval_batches
from diffjax.evaluate import plots
from diffjax.evaluate.results import format_table
from diffjax.evaluate.tasks.base import EvalContext, TaskResult
from diffjax.model.attention import AttentionMaps

FIGURE = "outliers_by_layer.png"
RANKS = (1, 2, 3, 10, 100)
KINDS = {"attention_logits": "attention logits", "hidden_states": "hidden states"}
# Bin edges: 0, then 1e-6 .. 1e6 in 2,400 steps of 10^(12/2400) (1.16%); values outside land in the end bins.
EDGES = np.concatenate([[0.0], np.geomspace(1e-6, 1e6, 2401)])


class Magnitudes:
    """Running top values and histogram of magnitudes, per layer."""

    def __init__(self, num_layers: int):
        self.top = np.full((num_layers, max(RANKS)), -1.0)  # -1: no value yet
        self.counts = np.zeros((num_layers, len(EDGES) - 1), np.int64)

    def add(self, top: np.ndarray, counts: np.ndarray) -> None:
        """Merge one batch: `top` `[layers, max(RANKS)]` (-1 pads), `counts` `[layers, bins]`."""
        self.top = -np.sort(-np.concatenate([self.top, top], axis=1), axis=1)[:, : max(RANKS)]
        self.counts += counts

    def ranked(self, layer: int | None = None) -> dict[str, float]:
        """The k-th largest magnitude for each k in `RANKS`, and the median, over one layer or all of them."""
        top = self.top.ravel() if layer is None else self.top[layer]
        top = -np.sort(-top[top >= 0])
        counts = self.counts.sum(axis=0) if layer is None else self.counts[layer]
        ranked = {f"top-{k}": float(top[k - 1]) if k <= len(top) else None for k in RANKS}
        return ranked | {"median": histogram_median(counts)}


def histogram_median(counts: np.ndarray) -> float:
    """The (lower) median of values binned by `EDGES`: the geometric centre of the bin holding it."""
    bin_index = int(np.searchsorted(np.cumsum(counts), counts.sum() / 2))
    low, high = EDGES[bin_index], EDGES[bin_index + 1]
    return float(np.sqrt(low * high)) if low > 0 else float(high / 2)


def _summarise(values: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Top `max(RANKS)` magnitudes (-1 where fewer are kept) and the bin counts of the kept ones."""
    magnitudes = jnp.abs(values.astype(jnp.float32))
    flat = jnp.where(keep, magnitudes, -1.0).ravel()
    top = jax.lax.top_k(flat, min(max(RANKS), flat.size))[0]
    top = jnp.pad(top, (0, max(RANKS) - top.size), constant_values=-1.0)
    clipped = jnp.clip(magnitudes, 0.0, EDGES[-1])
    counts, _ = jnp.histogram(clipped, bins=jnp.asarray(EDGES, jnp.float32), weights=keep.astype(jnp.float32))
    return top, counts.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def layer_magnitudes(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per layer, `_summarise` of the attention logits and of the hidden states of one packed batch."""
    real = batch["segment_ids"] != 0

    def reduce(hidden: jax.Array, maps: AttentionMaps) -> dict[str, tuple[jax.Array, jax.Array]]:
        return {
            "attention_logits": _summarise(maps.logits, jnp.broadcast_to(maps.mask, maps.logits.shape)),
            "hidden_states": _summarise(hidden, jnp.broadcast_to(real[..., None], hidden.shape)),
        }

    model = nnx.merge(graphdef, params)
    return model.probe(batch["inputs"], reduce, batch["positions"], batch["segment_ids"])


def run(context: EvalContext) -> TaskResult:
    model, split = context.model, context.options.split
    batches = eval_batches(context.config, context.tokenizer, split, context.options.outlier_batches)
    stats = {kind: Magnitudes(context.config.model.num_layers) for kind in KINDS}
    for batch in tqdm(batches, desc=f"outliers ({split})", unit="batch"):
        for kind, (top, counts) in layer_magnitudes(model.graphdef, model.params, batch).items():
            stats[kind].add(np.asarray(top), np.asarray(counts))
    tokens = int(sum((batch["segment_ids"] != 0).sum() for batch in batches))
    figures: dict = {"split": split, "batches": len(batches), "tokens": tokens}
    for kind, magnitudes in stats.items():
        figures[kind] = magnitudes.ranked()
        figures[f"{kind}_by_layer"] = [magnitudes.ranked(layer) for layer in range(len(magnitudes.top))]
    figures["figure"] = _plot(context, figures)
    header = ["activation", *(f"top-{k}" for k in RANKS), "median"]
    rows = [[name, *(_number(figures[kind][key]) for key in header[1:])] for kind, name in KINDS.items()]
    table = f"activation outliers over {tokens:,} tokens ({split})\n" + format_table(header, rows)
    summary = {f"{name} top-1 / median": f"{_number(figures[kind]['top-1'])} / "
               f"{_number(figures[kind]['median'])}" for kind, name in KINDS.items()}  # fmt: skip
    return TaskResult(figures, summary, (table,))


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if value < 10 else f"{value:.1f}"


def _plot(context: EvalContext, figures: dict) -> str:
    figure = plots.new_figure(10.0, 4.2)
    for axes, (kind, name) in zip(figure.subplots(1, 2), KINDS.items(), strict=True):
        by_layer = figures[f"{kind}_by_layer"]
        layers = np.arange(len(by_layer))
        for key, style in (("top-1", "o-"), ("top-10", "s-"), ("top-100", "^-"), ("median", "x--")):
            axes.plot(layers, [np.nan if row[key] is None else row[key] for row in by_layer], style, label=key)
        axes.set_yscale("log")
        axes.set_xticks(layers)
        axes.set_xlabel("layer (0-based)")
        axes.set_ylabel(f"|{name}| (log scale)")
        axes.set_title(name)
        axes.grid(alpha=0.3, which="both")
        axes.legend()
    figure.suptitle(context.title(f"Activation magnitudes by layer over {figures['tokens']:,} tokens"))
    return plots.save(figure, context.out / FIGURE)
