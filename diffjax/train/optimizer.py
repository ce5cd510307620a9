"""AdamW with warmup and cosine/linear decay, gradient clipping, and weight decay on matrices only."""

import jax
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then decay to `end_learning_rate` at `total_steps`."""
    decay_steps = max(config.total_steps - config.warmup_steps, 1)
    if config.lr_schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            config.learning_rate, decay_steps, alpha=config.end_learning_rate / config.learning_rate
        )
    else:
        decay = optax.linear_schedule(config.learning_rate, config.end_learning_rate, decay_steps)
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


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
