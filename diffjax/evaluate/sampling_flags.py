"""The flags of sampling, shared by `python -m diffjax.generate` and the `generate` task of
`python -m diffjax.evaluate` (absl flags are process-global: each may be defined once)."""

from absl import flags

from diffjax.cli import UsageError

PROMPTS = flags.DEFINE_multi_string("prompt", [], "Text to continue; repeat the flag for several prompts.")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 128, "Tokens to generate per prompt at most.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Softmax temperature; 0 is greedy.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only (0: all).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this probability (1: all).")
SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")


def sampling():
    """The `Sampling` the flags ask for; `UsageError` for settings that would sample something else."""
    from diffjax.evaluate.generate import Sampling  # JAX starts only once the flags are known to be good

    if MAX_TOKENS.value < 1:
        raise UsageError(f"--max_tokens={MAX_TOKENS.value} must be at least 1")
    chosen = Sampling(TEMPERATURE.value, TOP_K.value, TOP_P.value)
    chosen.check()
    return chosen
