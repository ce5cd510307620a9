"""AdamW with warmup and cosine/linear decay, gradient clipping, and weight decay on matrices only."""

import jax
import ml_collections
import optax


def warmup_steps(config: ml_collections.ConfigDict) -> int:
    """Steps of linear warmup: `warmup_steps`, or every step of a run shorter than that (a smoke run)."""
    return min(config.warmup_steps, config.total_steps)


def warmup_note(config: ml_collections.ConfigDict) -> str | None:
    """The line a run prints once when its warmup is cut to its length, else None."""
    if config.warmup_steps <= config.total_steps:
        return None
    return (
        f"warmup_steps={config.warmup_steps} exceeds total_steps={config.total_steps}: "
        f"warming up over all {config.total_steps} steps"
    )


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then decay to `end_learning_rate` at `total_steps`."""
    warmup = warmup_steps(config)
    decay_steps = max(config.total_steps - warmup, 1)
    if config.lr_schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            config.learning_rate, decay_steps, alpha=config.end_learning_rate / config.learning_rate
        )
    else:
        decay = optax.linear_schedule(config.learning_rate, config.end_learning_rate, decay_steps)
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), decay], [warmup])


def _parameter_name(path: tuple) -> str:
    """The innermost attribute name of a parameter (`kernel`, `scale`, `lambda_q1`, ...)."""
    return [key.key for key in path if isinstance(key, jax.tree_util.DictKey)][-1]


def weight_decay_mask(params):
    """True for projection kernels and embeddings; norm gains and lambda vectors are not decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _parameter_name(path) in ("kernel", "embedding"), params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        ),
    )
