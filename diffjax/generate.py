"""Continue a prompt with a trained model:

    python -m diffjax.generate --workdir=runs/tiny_diff --prompt="The " [--prompt="def " ...] [--step=N]
        [--max_tokens=128] [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0] [--nokv_cache]

Each prompt is encoded with the run's tokenizer after a BOS (documents start so in training); generation
stops at `max_tokens` or the end-of-text id. Prints each prompt and its continuation, then the time taken.
"""

from absl import flags

from diffjax import files
from diffjax.cli import UsageError, run_main
from diffjax.evaluate import sampling_flags

PROGRAM = "python -m diffjax.generate"

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, its checkpoints/ or one step's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
_KV_CACHE = flags.DEFINE_bool("kv_cache", True, "Decode with the KV cache; off recomputes the whole sequence.")


def main(argv: list[str]) -> None:
    if argv[1:]:
        raise UsageError(f"unexpected arguments {argv[1:]}; usage: {PROGRAM} --workdir=<run dir> --prompt=<text>")
    if not _WORKDIR.value:
        raise UsageError("--workdir is required: the run directory to load")
    if not sampling_flags.PROMPTS.value or not all(sampling_flags.PROMPTS.value):
        raise UsageError('--prompt is required and must not be empty, e.g. --prompt="The "')
    sampling = sampling_flags.sampling()
    # Imported here so that bad flags are reported before JAX starts.
    from diffjax.data.tokenizer import load_tokenizer
    from diffjax.evaluate.generate import encode_prompt, generate, until_stop
    from diffjax.evaluate.load import load_model

    files.check_access(_WORKDIR.value, "--workdir")
    model, config = load_model(_WORKDIR.value, _STEP.value)
    tokenizer = load_tokenizer(config.data.tokenizer)
    for text in sampling_flags.PROMPTS.value:
        result = generate(
            model.graphdef,
            model.params,
            encode_prompt(tokenizer, text),
            sampling_flags.MAX_TOKENS.value,
            sampling,
            seed=sampling_flags.SEED.value,
            stop_id=tokenizer.eos_id,
            use_cache=_KV_CACHE.value,
        )
        tokens = until_stop(result.tokens, tokenizer.eos_id)
        print(text + tokenizer.decode(tokens))
        print(
            f"step {model.step}: {len(tokens)} tokens in {result.decode_seconds:.2f} s "
            f"({len(tokens) / result.decode_seconds:.1f} tokens/s; compiling took {result.compile_seconds:.2f} s)"
        )


if __name__ == "__main__":
    run_main(PROGRAM, main)
