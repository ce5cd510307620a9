"""Multi-needle retrieval (SPEC section 7) over a grid of context lengths x depths x (N needles, R queries).

Scoring is teacher-forced: each document is run once with its answers filled in, and a query counts as
retrieved when the argmax at every answer position is the answer's token (the space before the number
included). That is exactly "greedy decoding after `prompt_for(i)` reproduces the answer", for one forward
pass per document instead of one per generated token.

Documents come from `diffjax.data.needles.make_document` with the validation split's filler and the
seed `data.needles.seed + 2` (training documents use the seed, validation documents seed + 1), so none
was trained on; every depth of one (length, N, R, index) holds the same needles and filler.
"""

import dataclasses
import functools
import itertools
from collections.abc import Callable, Hashable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from diffjax.cli import UsageError
from diffjax.data import corpus
from diffjax.data.needles import CITIES, NeedleDocument, make_document, min_context_length, split_sentences
from diffjax.data.tokenizer import Tokenizer
from diffjax.evaluate import plots
from diffjax.evaluate.tasks.base import EvalContext, NeedleGrid, TaskResult

FIGURE = "needles_heatmap.png"
SEED_OFFSET = 2
NOTHING_RETRIEVED = "the model retrieved no needle (no query of any cell was answered)"


def check_grid(grid: NeedleGrid) -> None:
    """`UsageError` for a grid `make_document` would refuse, before any model is loaded."""
    if grid.documents < 1 or grid.batch_size < 1:
        raise UsageError("--needle_documents and --needle_batch_size must be positive")
    if any(len(set(values)) < len(values) for values in (grid.lengths, grid.depths, grid.counts)):
        raise UsageError("--needle_lengths, --needle_depths and --needle_counts list a value twice")
    if not all(0 <= depth <= 1 for depth in grid.depths):
        raise UsageError(f"--needle_depths={','.join(map(str, grid.depths))}: depths are fractions in [0, 1]")
    for n, r in grid.counts:
        if not 1 <= r <= n <= len(CITIES):
            raise UsageError(f"--needle_counts: {n}x{r} is not NxR with 1 <= R <= N <= {len(CITIES)}")
        shortest = min_context_length(n, r)
        if min(grid.lengths) < shortest:
            raise UsageError(
                f"--needle_lengths: {min(grid.lengths)} bytes cannot hold {n} needles and {r} "
                f"questions; use at least {shortest}"
            )


@dataclasses.dataclass(frozen=True)
class AnswerSpan:
    """Where one answer sits in a document's token sequence."""

    start: int  # index of the answer's first token
    tokens: tuple[int, ...]


def encode_document(tokenizer: Tokenizer, document: NeedleDocument) -> tuple[np.ndarray, tuple[AnswerSpan, ...]]:
    """`BOS text` as ids, each answer (with its leading space) encoded on its own, and the answers' spans.

    Encoding the answers apart keeps the tokens before each one equal to `encode(prompt_for(i))`, whatever
    the tokenizer merges across the boundary.
    """
    ids, spans, cursor = [tokenizer.bos_id], [], 0
    for offset, answer in zip(document.answer_offsets, document.answers, strict=True):
        ids += tokenizer.encode(document.text[cursor : offset - 1]).tolist()
        answer_ids = tuple(tokenizer.encode(" " + answer).tolist())
        spans.append(AnswerSpan(len(ids), answer_ids))
        ids += answer_ids
        cursor = offset + len(answer)
    ids += tokenizer.encode(document.text[cursor:]).tolist()
    return np.asarray(ids, np.int32), tuple(spans)


def score_queries(predicted: np.ndarray, spans: Sequence[AnswerSpan]) -> list[bool]:
    """Whether each answer is retrieved, given `predicted[t]`: the model's next token after reading `t + 1` tokens.

    Retrieved means the prediction at every answer position equals the answer token.
    """
    results = []
    for span in spans:
        guess = predicted[span.start - 1 : span.start - 1 + len(span.tokens)]
        results.append(len(guess) == len(span.tokens) and bool(np.array_equal(guess, span.tokens)))
    return results


@functools.partial(jax.jit, static_argnums=0)
def greedy_tokens(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
    """`[B, T]` argmax next tokens (only ids leave the device, never `[B, T, vocab]` logits)."""
    return jnp.argmax(nnx.merge(graphdef, params)(tokens), axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class NeedleItem:
    """One document of the grid, encoded."""

    length: int
    counts: tuple[int, int]
    depth: float
    document: NeedleDocument
    ids: np.ndarray
    spans: tuple[AnswerSpan, ...]


def needle_items(grid: NeedleGrid, tokenizer: Tokenizer, seed: int) -> list[NeedleItem]:
    """Every document of `grid`, ordered by length, then (N, R), then depth."""
    filler = split_sentences(corpus.python_docs("validation"))
    items = []
    cells = itertools.product(grid.lengths, grid.counts, grid.depths, range(grid.documents))
    for length, (n, r), depth, index in cells:
        document = make_document(
            filler, index, seed=seed, context_length=length, num_needles=n, num_queries=r, depth=depth
        )
        items.append(NeedleItem(length, (n, r), depth, document, *encode_document(tokenizer, document)))
    return items


def padded_batches(
    items: list[NeedleItem], size: int, key: Callable[[NeedleItem], Hashable]
) -> Iterator[tuple[list[NeedleItem], np.ndarray]]:
    """Runs of up to `size` consecutive items of equal `key`, with their ids as one right-padded `[size, T]`
    array (causal attention never sees the padding); one shape per key, so one compile per key."""
    for _, group in itertools.groupby(items, key=key):
        group = list(group)
        width = max(len(item.ids) for item in group)
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            tokens = np.zeros((size, width), np.int32)
            for row, item in enumerate(chunk):
                tokens[row, : len(item.ids)] = item.ids
            yield chunk, tokens


def _score(context: EvalContext, items: list[NeedleItem]) -> list[list[bool]]:
    """Per item, whether each query is retrieved; batches of one fixed shape per context length."""
    model, scores = context.model, []
    with tqdm(total=len(items), desc="needles", unit="doc") as bar:
        for chunk, tokens in padded_batches(items, context.options.needles.batch_size, lambda item: item.length):
            predicted = np.asarray(greedy_tokens(model.graphdef, model.params, tokens))
            scores += [score_queries(predicted[row], item.spans) for row, item in enumerate(chunk)]
            bar.update(len(chunk))
    return scores


def run(context: EvalContext) -> TaskResult:
    grid = context.options.needles
    items = needle_items(grid, context.tokenizer, context.config.data.needles.seed + SEED_OFFSET)
    scores = _score(context, items)
    cells = []
    for (length, counts, depth), group in itertools.groupby(
        zip(items, scores, strict=True), key=lambda pair: (pair[0].length, pair[0].counts, pair[0].depth)
    ):
        hits = [hit for _, row in group for hit in row]
        cells.append(
            {"length": length, "num_needles": counts[0], "num_queries": counts[1], "depth": depth,
             "queries": len(hits), "accuracy": float(np.mean(hits))}
        )  # fmt: skip
    by_counts = {_label(counts): _mean(cells, counts) for counts in grid.counts}
    all_hits = [hit for row in scores for hit in row]
    figures = {
        "scoring": "teacher-forced: argmax at every answer token (with its leading space) equals the answer",
        "context_unit": "bytes of text per document; tokens are these plus BOS for the byte tokenizer",
        "trained_seq_len": context.config.seq_len,
        "documents_per_cell": grid.documents,
        "mean_tokens_by_length": {
            str(length): float(np.mean([len(item.ids) for item in items if item.length == length]))
            for length in grid.lengths
        },
        "accuracy": float(np.mean(all_hits)),
        "accuracy_by_counts": by_counts,
        "cells": cells,
        "figure": _plot(context, cells),
    }
    summary = {f"accuracy {label}": f"{value:.3f}" for label, value in by_counts.items()}
    summary["accuracy (all)"] = f"{figures['accuracy']:.3f} ({len(all_hits)} queries)"
    if not any(all_hits):
        summary["accuracy (all)"] += f": {NOTHING_RETRIEVED}"
    return TaskResult(figures, summary, tuple(_table(cells, grid, counts) for counts in grid.counts))


def _label(counts: tuple[int, int]) -> str:
    return f"N={counts[0]},R={counts[1]}"


def _mean(cells: list[dict], counts: tuple[int, int]) -> float:
    chosen = [c for c in cells if (c["num_needles"], c["num_queries"]) == counts]
    return float(sum(c["accuracy"] * c["queries"] for c in chosen) / sum(c["queries"] for c in chosen))


def _matrix(cells: list[dict], grid: NeedleGrid, counts: tuple[int, int]) -> np.ndarray:
    """Accuracy `[depth, length]` for one (N, R)."""
    matrix = np.zeros((len(grid.depths), len(grid.lengths)))
    for c in cells:
        if (c["num_needles"], c["num_queries"]) == counts:
            matrix[grid.depths.index(c["depth"]), grid.lengths.index(c["length"])] = c["accuracy"]
    return matrix


def _table(cells: list[dict], grid: NeedleGrid, counts: tuple[int, int]) -> str:
    matrix = _matrix(cells, grid, counts)
    lines = [f"needles {_label(counts)}: accuracy by depth (rows) and context length in bytes (columns)"]
    lines.append("depth  " + "".join(f"{length:>8}" for length in grid.lengths))
    for depth, row in zip(grid.depths, matrix, strict=True):
        lines.append(f"{depth:>5.0%}  " + "".join(f"{value:>8.2f}" for value in row))
    return "\n".join(lines)


def _plot(context: EvalContext, cells: list[dict]) -> str:
    """Accuracy heatmaps, one panel per (N, R); a sentence instead when nothing was retrieved at all."""
    grid = context.options.needles
    if not any(cell["accuracy"] for cell in cells):
        figure = plots.new_figure(7.0, 2.4)
        queries = sum(cell["queries"] for cell in cells)
        message = f"{NOTHING_RETRIEVED[0].upper()}{NOTHING_RETRIEVED[1:]}:\naccuracy 0 in all {len(cells)} cells"
        figure.text(0.5, 0.45, f"{message} ({queries} queries).", ha="center", va="center", fontsize=12)
        figure.suptitle(context.title("Multi-needle retrieval accuracy"))
        return plots.save(figure, context.out / FIGURE)
    figure = plots.new_figure(width=2.6 * len(grid.counts) + 1.6, height=0.45 * len(grid.depths) + 2.4)
    panels = figure.subplots(1, len(grid.counts), squeeze=False, sharey=True)[0]
    for axes, counts in zip(panels, grid.counts, strict=True):
        matrix = _matrix(cells, grid, counts)
        image = axes.imshow(matrix, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for (i, j), value in np.ndenumerate(matrix):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        axes.set_xticks(range(len(grid.lengths)), [str(length) for length in grid.lengths])
        axes.set_yticks(range(len(grid.depths)), [f"{depth:.0%}" for depth in grid.depths])
        axes.set_xlabel("context length (bytes)")
        axes.set_title(_label(counts))
    panels[0].set_ylabel("needle depth (% of haystack)")
    figure.colorbar(image, ax=list(panels), label="retrieval accuracy (fraction of queries)")
    figure.suptitle(context.title("Multi-needle retrieval accuracy"))
    return plots.save(figure, context.out / FIGURE)
