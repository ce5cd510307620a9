"""Where attention goes when the model retrieves a needle: the paper's Table 3 quantities and Figure 1 maps.

For every question of the needle grid's documents, the query is the token right before the answer (the
one whose next-token prediction is the answer's first token). Its row of the effective attention map
(A for the standard Transformer, A1 - lambda A2 for differential attention) is split over the keys into:

- answer: the answer's digits where the needle states them in the haystack;
- noise: the rest of the haystack (filler and the other needles), the paper's irrelevant context;
- other: the beginning-of-sequence token, the rest of the asked-for needle's sentence, and the question
  lines up to the query.

A row is normalised by its sum (1 for softmax, 1 - lambda for v1, 1 - lambda_t for v2), so the three
shares sum to 1 exactly; for DIFF a share can be negative where lambda A2 outweighs A1. Shares are
averaged over heads, queries and documents, per layer and per depth; "overall" averages the layers.
Token positions of haystack text come from encoding its prefix, exact for the byte tokenizer and to
within a boundary merge for SentencePiece.
"""

import functools

import jax
import numpy as np
from flax import nnx
from matplotlib.figure import Figure
from tqdm import tqdm

from diffjax.cli import UsageError
from diffjax.data.needles import NEEDLE
from diffjax.data.tokenizer import Tokenizer
from diffjax.evaluate import plots
from diffjax.evaluate.tasks.base import EvalContext, TaskResult
from diffjax.evaluate.tasks.needles import SEED_OFFSET, NeedleItem, needle_items, padded_batches
from diffjax.model.attention import AttentionMaps

SHARES_FIGURE = "attention_shares.png"
ROW_STYLES = {
    "A1": {"linewidth": 3.0, "alpha": 0.45, "zorder": 1},
    "A1 - lambda A2 (effective)": {"color": "k", "linestyle": "--", "zorder": 3},
}
MAP_FIGURE = "attention_map.png"
OTHER, ANSWER, NOISE = 0, 1, 2  # key regions of a query row
SHARE_NOTE = (
    "shares are fractions of the row's sum (1 - lambda for DIFF). A share below 0 means lambda A2 outweighs A1 on\n"
    "those keys (the subtraction cancels past zero); a share above 1 means the other keys sum below 0 that way."
)


def key_regions(tokenizer: Tokenizer, item: NeedleItem) -> np.ndarray:
    """int8 `[R, T]`: the region of every key position for each question's query row (`OTHER` after it)."""
    document, length = item.document, len(item.ids)

    def token_index(char: int) -> int:
        return 1 + len(tokenizer.encode(document.text[:char]))  # BOS first

    haystack_end = token_index(len(" ".join(document.haystack)))
    by_city = {city: index for index, (city, _) in enumerate(document.needles)}
    regions = np.full((len(item.spans), length), OTHER, np.int8)
    for row, city in enumerate(document.cities):
        number = document.needles[by_city[city]][1]
        sentence = NEEDLE.format(city=city, number=number)
        start = document.needle_offsets[by_city[city]]
        digits = start + sentence.rindex(number)
        regions[row, 1:haystack_end] = NOISE
        regions[row, token_index(start) : token_index(start + len(sentence))] = OTHER
        regions[row, token_index(digits) : token_index(digits + len(number))] = ANSWER
    return regions


def region_shares(rows: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(answer, noise) shares of attention rows `[..., R, T]` whose keys have `regions` `[R, T]`; the rows
    are normalised by their sums, so `1 - answer - noise` is the share of `OTHER`."""
    total = rows.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tuple((rows * (regions == region)).sum(axis=-1) / total for region in (ANSWER, NOISE))


@functools.partial(jax.jit, static_argnums=0)
def query_rows(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, queries: jax.Array) -> jax.Array:
    """float32 `[layers, B, heads, R, T]`: the effective attention rows of query positions `queries` `[B, R]`."""

    def reduce(hidden: jax.Array, maps: AttentionMaps) -> jax.Array:
        del hidden
        return maps.effective

    return nnx.merge(graphdef, params).probe(tokens, reduce, rows=queries)


@functools.partial(jax.jit, static_argnums=(0, 3))
def head_maps(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, head: int) -> tuple[jax.Array, ...]:
    """Every layer's `[T, T]` maps of one head for a single document `[1, T]`: (positive, negative) or
    (positive,) when nothing is subtracted."""

    def reduce(hidden: jax.Array, maps: AttentionMaps) -> tuple[jax.Array, ...]:
        del hidden
        parts = (maps.positive,) if maps.negative is None else (maps.positive, maps.negative)
        return tuple(part[0, head] for part in parts)

    return nnx.merge(graphdef, params).probe(tokens, reduce)


def run(context: EvalContext) -> TaskResult:
    grid, cfg = context.options.needles, context.config.model
    num_maps = cfg.num_heads * (2 if cfg.attention_type == "standard" else 1)
    layer, head = context.options.map_layer, context.options.map_head
    if not -cfg.num_layers <= layer < cfg.num_layers or not 0 <= head < num_maps:
        raise UsageError(
            f"--attention_layer={layer} --attention_head={head}: this model has {cfg.num_layers} layers "
            f"(negative counts from the last) and {num_maps} attention heads"
        )
    items = needle_items(grid, context.tokenizer, context.config.data.needles.seed + SEED_OFFSET)
    answer, noise = _shares(context, items)  # [docs, layers], averaged over heads and queries
    depths = np.asarray([item.depth for item in items])
    by_depth = {
        str(depth): {"answer": float(answer[depths == depth].mean()), "noise": float(noise[depths == depth].mean())}
        for depth in grid.depths
    }
    figures = {
        "normalisation": "each query row divided by its sum (1 - lambda for DIFF), so answer + noise + other = 1",
        "documents": len(items),
        "answer": float(answer.mean()),
        "noise": float(noise.mean()),
        "answer_by_layer": answer.mean(axis=0).tolist(),
        "noise_by_layer": noise.mean(axis=0).tolist(),
        "by_depth": by_depth,
        "figure": _plot_shares(context, answer, noise, depths),
        "map_figure": plots.save(map_figure(context, items, layer % cfg.num_layers, head), context.out / MAP_FIGURE),
    }
    summary = {"answer share": f"{figures['answer']:.3f}", "noise share": f"{figures['noise']:.3f}"}
    for name in ("answer", "noise"):
        if not 0 <= figures[name] <= 1:
            summary[f"{name} share"] += f" ({'above 1' if figures[name] > 1 else 'below 0'}: see the note below)"
    rows = [f"{float(depth):>5.0%}  {v['answer']:>6.3f}  {v['noise']:>6.3f}" for depth, v in by_depth.items()]
    header = ["attention of the answer's query (mean over layers)", "depth  answer   noise"]
    table = "\n".join([*header, *rows, *([SHARE_NOTE] if cfg.attention_type != "standard" else [])])
    return TaskResult(figures, summary, (table,))


def _shares(context: EvalContext, items: list[NeedleItem]) -> tuple[np.ndarray, np.ndarray]:
    """Answer and noise shares `[documents, layers]`, each the mean over heads and questions."""
    model, size, answer, noise = context.model, context.options.needles.batch_size, [], []
    with tqdm(total=len(items), desc="attention", unit="doc") as bar:
        for chunk, tokens in padded_batches(items, size, lambda item: (item.length, item.counts)):
            queries = np.zeros((size, len(chunk[0].spans)), np.int32)  # one R per (length, counts)
            for row, item in enumerate(chunk):
                queries[row] = [span.start - 1 for span in item.spans]
            rows = np.asarray(query_rows(model.graphdef, model.params, tokens, queries))
            for row, item in enumerate(chunk):
                regions = np.zeros((len(item.spans), tokens.shape[1]), np.int8)
                regions[:, : len(item.ids)] = key_regions(context.tokenizer, item)
                a, n = region_shares(rows[:, row], regions)  # [layers, heads, R]
                answer.append(a.mean(axis=(1, 2)))
                noise.append(n.mean(axis=(1, 2)))
            bar.update(len(chunk))
    return np.stack(answer), np.stack(noise)


def _plot_shares(context: EvalContext, answer: np.ndarray, noise: np.ndarray, depths: np.ndarray) -> str:
    figure = plots.new_figure(10.0, 4.2)
    by_depth, by_layer = figure.subplots(1, 2)
    levels = sorted(set(depths.tolist()))
    for values, label, marker in ((answer, "answer span", "o"), (noise, "noise (rest of haystack)", "s")):
        by_depth.plot(
            [d * 100 for d in levels], [values[depths == d].mean() for d in levels], marker=marker, label=label
        )
        by_layer.plot(np.arange(values.shape[1]), values.mean(axis=0), marker=marker, label=label)
    by_depth.set_xlabel("needle depth (% of haystack)")
    by_depth.set_title("by depth (mean over layers)")
    by_layer.set_xlabel("layer (0-based)")
    by_layer.set_xticks(np.arange(answer.shape[1]))
    by_layer.set_title("by layer (mean over depths)")
    for axes in (by_depth, by_layer):
        axes.set_ylabel("share of the query's attention (fraction)")
        axes.axhline(0, color="0.6", linewidth=0.8)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(context.title("Attention of the answer's query: answer span vs noise"))
    return plots.save(figure, context.out / SHARES_FIGURE)


def map_figure(context: EvalContext, items: list[NeedleItem], layer: int, head: int) -> Figure:
    """One document's maps for the chosen layer and head, and its first question's query row below them:
    the shortest context, the depth nearest the middle."""
    shortest = [item for item in items if item.length == items[0].length]
    item = min(shortest, key=lambda item: abs(item.depth - 0.5))
    parts = [
        np.asarray(part[layer])
        for part in head_maps(context.model.graphdef, context.model.params, item.ids[None], head)
    ]
    if len(parts) == 2:
        panels = [("A1", parts[0]), ("lambda A2", parts[1]), ("A1 - lambda A2 (effective)", parts[0] - parts[1])]
    else:
        panels = [("A (softmax)", parts[0])]
    query = item.spans[0].start - 1
    regions = key_regions(context.tokenizer, item)[0]

    figure = plots.new_figure(max(9.0, 4.2 * len(panels) + 1.0), 8.0)
    grid = figure.add_gridspec(2, len(panels), height_ratios=(3, 2))
    scale = max(float(np.quantile(np.abs(values[np.tril_indices(len(values))]), 0.999)) for _, values in panels)
    maps = [figure.add_subplot(grid[0, column]) for column in range(len(panels))]
    for axes, (name, values) in zip(maps, panels, strict=True):
        image = axes.imshow(values, cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
        axes.axhline(query, color="k", linewidth=0.6, linestyle=":")
        axes.set_title(name)
        axes.set_xlabel("key position (token)")
        axes.set_ylabel("query position (token)")
    colorbar_axes = maps[-1].inset_axes((1.04, 0.0, 0.05, 1.0))  # beside the maps, not the figure's edge
    figure.colorbar(image, cax=colorbar_axes, label="attention weight")
    row = figure.add_subplot(grid[1, :])
    for name, values in panels:  # A1 wide and pale under the others, the effective row dashed on top
        style = ROW_STYLES.get(name, {})
        row.plot(values[query, : query + 1], label=name, **{"linewidth": 1.0, **style})
    answer = np.flatnonzero(regions == ANSWER)
    row.axvspan(answer[0] - 0.5, answer[-1] + 0.5, color="C2", alpha=0.3, label="answer span", zorder=0)
    if (haystack := np.flatnonzero(regions == NOISE)).size:
        row.axvline(haystack[-1] + 0.5, color="0.5", linestyle="--", linewidth=0.8, label="end of haystack")
    row.set_xlabel("key position (token)")
    row.set_ylabel("attention weight")
    row.set_title(f"row of the query before the answer (token {query}, dotted above)")
    row.grid(alpha=0.3)
    row.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    what = f"Attention maps, layer {layer}, head {head}, needle depth {item.depth:.0%}"
    figure.suptitle(context.title(what))
    return figure
