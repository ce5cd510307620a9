"""Continue a prompt with a trained model:

    python -m diffjax.generate --workdir=runs/tiny_diff --prompt="The " [--step=N] [--max_tokens=128]
        [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0] [--nokv_cache]

The prompt is encoded with the run's tokenizer after a BOS (documents start so in training); generation
stops at `max_tokens` or the end-of-text id. Prints the prompt and continuation, then the time taken.
"""

from absl import flags

from diffjax.cli import UsageError, run_main

PROGRAM = "python -m diffjax.generate"

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, its checkpoints/ or one step's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this probability (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
_KV_CACHE = flags.DEFINE_bool("kv_cache", True, "Decode with the KV cache; off recomputes the whole sequence.")


def main(argv: list[str]) -> None:
    if argv[1:]:
        raise UsageError(f"unexpected arguments {argv[1:]}; usage: {PROGRAM} --workdir=<run dir> --prompt=<text>")
    if not _WORKDIR.value:
        raise UsageError("--workdir is required: the run directory to load")
    if not _PROMPT.value:
        raise UsageError('--prompt is required and must not be empty, e.g. --prompt="The "')
    # Imported here so that bad flags are reported before JAX starts.
    from diffjax.data.tokenizer import load_tokenizer
    from diffjax.evaluate.generate import Sampling, encode_prompt, generate, until_stop
    from diffjax.evaluate.load import load_model

    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    sampling.check()
    model, config = load_model(_WORKDIR.value, _STEP.value)
    tokenizer = load_tokenizer(config.data.tokenizer)
    prompt = encode_prompt(tokenizer, _PROMPT.value)
    result = generate(
        model.graphdef,
        model.params,
        prompt,
        _MAX_TOKENS.value,
        sampling,
        seed=_SEED.value,
        stop_id=tokenizer.eos_id,
        use_cache=_KV_CACHE.value,
    )
    tokens = until_stop(result.tokens, tokenizer.eos_id)
    print(_PROMPT.value + tokenizer.decode(tokens))
    print(
        f"step {model.step}: {len(tokens)} tokens in {result.decode_seconds:.2f} s "
        f"({len(tokens) / result.decode_seconds:.1f} tokens/s; compiling took {result.compile_seconds:.2f} s)"
    )


if __name__ == "__main__":
    run_main(PROGRAM, main)
