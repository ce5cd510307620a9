"""Sampling continuations from a model: greedy, temperature, top-k and top-p, with a KV cache.

    from diffjax import load_model
    from diffjax.evaluate.generate import Sampling, encode_prompt, generate
    model, config = load_model("runs/tiny_diff")
    ids = generate(model.graphdef, model.params, encode_prompt(tokenizer, "The "), 64, Sampling(temperature=0.8))

Decoding is one jitted `lax.while_loop`: the prompt fills the cache in one pass (prefill), then each token
is one cached step. The prompt is right-padded to a power-of-two bucket and the sampling settings and seed
are traced, so a program is compiled once per (prompt bucket, max_tokens). `use_cache=False` recomputes
the whole sequence for every token instead: the cache's oracle (same tokens, same draws), and a check a
user can run.
"""

import functools
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax.cli import UsageError
from diffjax.data.tokenizer import Tokenizer
from diffjax.model import DiffTransformer
from diffjax.model.attention import KVCache

MIN_BUCKET = 16  # shortest padded prompt: short prompts share one compiled program


class Sampling(NamedTuple):
    """How the next token is chosen; traced values, so changing them recompiles nothing."""

    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of most likely tokens holding this much probability (1: all)

    def check(self) -> None:
        """Refuse settings that would silently sample something else."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise UsageError(f"top_k={self.top_k} must be >= 0 (0: no top-k cut)")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p={self.top_p} must be in (0, 1] (1: no nucleus cut)")


GREEDY = Sampling()


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """int32 `[B]` ids drawn from `[B, V]` logits (in float32), filtered as Hugging Face does: temperature,
    then top-k, then top-p over what top-k kept. Tokens tied with the last kept one are kept too."""
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(sampling.temperature, jnp.float32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    ordered = -jnp.sort(-scaled, axis=-1)
    rank = jnp.arange(scaled.shape[-1])
    in_top_k = (sampling.top_k == 0) | (rank < sampling.top_k)
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
    kept = in_top_k & (jnp.cumsum(probs, axis=-1) - probs < sampling.top_p)  # a prefix; the first always
    threshold = jnp.take_along_axis(ordered, kept.sum(axis=-1, keepdims=True) - 1, axis=-1)
    drawn = jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def prompt_bucket(length: int) -> int:
    """The padded prompt length: the next power of two, at least `MIN_BUCKET`."""
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


def encode_prompt(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """`text` as training saw a document's start: BOS, then its ids (so an empty text is a valid prompt)."""
    return np.concatenate([[tokenizer.bos_id], tokenizer.encode(text)]).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_tokens", "use_cache"))
def _generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt: jax.Array,
    length: jax.Array,
    key: jax.Array,
    sampling: Sampling,
    stop_id: jax.Array,
    also_stop: jax.Array,
    *,
    max_tokens: int,
    use_cache: bool,
) -> jax.Array:
    """`[B, max_tokens]` ids following the first `length` ids of the padded `[B, bucket]` prompts."""

    def model(params: nnx.State) -> DiffTransformer:
        """The module of `params` as the loop body sees them (NNX refuses a module from an outer trace)."""
        return nnx.merge(graphdef, params)

    batch, bucket = prompt.shape
    sequence = jnp.zeros((batch, bucket + max_tokens), jnp.int32).at[:, :bucket].set(prompt)
    out = jnp.full((batch, max_tokens), jnp.maximum(stop_id, 0), jnp.int32)

    if use_cache:
        logits, cache = model(params).decode(prompt, model(params).init_cache(batch, sequence.shape[1]), 0)
        logits = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)

        def advance(params: nnx.State, out: jax.Array, cache: KVCache, i: jax.Array) -> tuple[jax.Array, KVCache]:
            """Logits after generated token `i`, from its cached step."""
            token = jax.lax.dynamic_slice_in_dim(out, i, 1, axis=1)
            logits, cache = model(params).decode(token, cache, length + i)
            return logits[:, 0], cache

    else:

        def advance(params: nnx.State, out: jax.Array, cache: tuple, i: jax.Array) -> tuple[jax.Array, tuple]:
            """Logits after generated token `i` (-1: the prompt's last), from the whole sequence so far."""
            logits = model(params)(jax.lax.dynamic_update_slice(sequence, out, (0, length)))
            return jax.lax.dynamic_index_in_dim(logits, length + i, axis=1, keepdims=False), cache

        logits, cache = advance(params, out, (), jnp.int32(-1))  # causal: the unwritten `out` is not seen

    def emit(i: jax.Array, out: jax.Array, logits: jax.Array, done: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Sample token `i` (`stop_id` for rows that have stopped, at `stop_id` or one of `also_stop`)."""
        token = jnp.where(done, stop_id, sample(logits, jax.random.fold_in(key, i), sampling))
        return out.at[:, i].set(token), done | (token == stop_id) | jnp.isin(token, also_stop)

    def step(carry: tuple) -> tuple:
        params, i, out, logits, cache, done = carry
        out, done = emit(i, out, logits, done)
        logits, cache = advance(params, out, cache, i)
        return params, i + 1, out, logits, cache, done

    def more(carry: tuple) -> jax.Array:
        i, done = carry[1], carry[-1]
        return (i < max_tokens - 1) & ~done.all()

    carry = (params, jnp.int32(0), out, logits, cache, jnp.zeros(batch, bool))
    _, i, out, logits, _, done = jax.lax.while_loop(more, step, carry)
    return emit(i, out, logits, done)[0]  # the last token needs no forward pass after it


class Generation(NamedTuple):
    """What `generate` returns: the ids, and where the time went (compiling is skipped when cached)."""

    tokens: np.ndarray
    compile_seconds: float
    decode_seconds: float


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt: np.ndarray,
    max_tokens: int,
    sampling: Sampling = GREEDY,
    *,
    seed: int = 0,
    stop_id: int | None = None,
    also_stop: Sequence[int] = (),
    use_cache: bool = True,
) -> Generation:
    """The `max_tokens` ids that follow `prompt` (1-D, or `[B, L]` rows of one length sampled independently).

    A row ends at its first `stop_id` or id of `also_stop` (kept); the ids after it are `stop_id`. Bad arguments raise
    `UsageError`.
    """
    prompt = np.asarray(prompt)
    rows = np.atleast_2d(prompt)
    if prompt.ndim not in (1, 2) or rows.shape[1] == 0:
        raise UsageError(f"the prompt must be a non-empty 1-D or [B, L] array of ids, got shape {prompt.shape}")
    vocab = nnx.merge(graphdef, params).cfg.vocab_size
    if rows.min() < 0 or rows.max() >= vocab:
        raise UsageError(f"prompt ids must be in [0, {vocab}), got {rows.min()}..{rows.max()}")
    if max_tokens < 1:
        raise UsageError(f"max_tokens={max_tokens} must be at least 1")
    sampling.check()
    padded = np.zeros((rows.shape[0], prompt_bucket(rows.shape[1])), np.int32)
    padded[:, : rows.shape[1]] = rows
    args = (
        params,
        padded,
        np.int32(rows.shape[1]),
        jax.random.key(seed),
        Sampling(*(np.asarray(value) for value in sampling)),
        np.int32(-1 if stop_id is None else stop_id),
        np.resize(np.asarray([*also_stop, -1], np.int32), 1 << len(also_stop).bit_length()),  # few shapes
    )
    started = time.perf_counter()
    compiled = _generate.lower(graphdef, *args, max_tokens=max_tokens, use_cache=use_cache).compile()
    compiled_at = time.perf_counter()
    tokens = np.asarray(compiled(*args))
    decoded_at = time.perf_counter()
    return Generation(tokens[0] if prompt.ndim == 1 else tokens, compiled_at - started, decoded_at - compiled_at)


def until_stop(tokens: np.ndarray, stop_id: int | None) -> np.ndarray:
    """A generated 1-D row up to and including its first `stop_id`."""
    stops = np.flatnonzero(tokens == stop_id) if stop_id is not None else []
    return tokens[: stops[0] + 1] if len(stops) else tokens
