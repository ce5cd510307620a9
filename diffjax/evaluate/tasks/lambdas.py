"""The learned lambda of every layer against its lambda_init (differential attention v1 only).

lambda is computed by the model's own `DiffAttention.lambda_full`, in float32. V2's lambda is a
per-token sigmoid and the standard Transformer has none, so for them the task reports that it does not
apply rather than failing.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax.evaluate import plots
from diffjax.evaluate.tasks.base import EvalContext, TaskResult
from diffjax.model.attention import DiffAttention

FIGURE = "lambda_by_layer.png"
WHY_NOT = {
    "diff_v2": "differential attention v2 has no scalar lambda (it is a per-token sigmoid of the input)",
    "standard": "the standard Transformer has no lambda",
}


def learned_lambdas(context: EvalContext) -> np.ndarray:
    """lambda_full of each layer, as the forward pass computes it."""
    module = context.model.module
    lambda_fn = nnx.vmap(lambda attention, init: DiffAttention.lambda_full(attention, init, jnp.float32))
    return np.asarray(lambda_fn(module.blocks.attn, module.layer_constants().lambda_init))


def run(context: EvalContext) -> TaskResult:
    attention_type = context.config.model.attention_type
    if attention_type in WHY_NOT:
        reason = WHY_NOT[attention_type]
        return TaskResult({"applies": False, "reason": reason}, {"applies": f"no: {reason}"})
    learned = learned_lambdas(context)
    inits = context.model.module.cfg.lambda_inits()
    figures = {
        "applies": True,
        "lambda": learned.tolist(),
        "lambda_init": inits.tolist(),
        "figure": _plot(context, learned, inits),
    }
    summary = {"mean lambda": f"{learned.mean():.4f}", "mean lambda_init": f"{inits.mean():.4f}"}
    table = "\n".join(
        ["lambda by layer", "layer    lambda  lambda_init"]
        + [f"{i:>5}  {a:>8.4f}  {b:>11.4f}" for i, (a, b) in enumerate(zip(learned, inits, strict=True))]
    )
    return TaskResult(figures, summary, (table,))


def _plot(context: EvalContext, learned: np.ndarray, inits: np.ndarray) -> str:
    figure = plots.new_figure()
    axes = figure.add_subplot()
    layers = np.arange(len(learned))
    axes.plot(layers, learned, marker="o", label="learned lambda")
    axes.plot(layers, inits, marker="s", linestyle="--", label="lambda_init = 0.8 - 0.6 exp(-0.3 l)")
    axes.set_xlabel("layer l (0-based)")
    axes.set_ylabel("lambda (dimensionless)")
    axes.set_xticks(layers)
    axes.set_title(context.title("Learned lambda by layer"))
    axes.grid(alpha=0.3)
    axes.legend()
    return plots.save(figure, context.out / FIGURE)
