"""Samples from the checkpoint: each prompt continued with the KV cache and, as its oracle, by full
recomputation (same settings and seed, so the tokens must agree), plus one needle question answered by
actually generating, so a reader sees retrieval rather than a score.
"""

from diffjax.evaluate.generate import Generation, Sampling, encode_prompt, generate, until_stop
from diffjax.evaluate.tasks.base import EvalContext, TaskResult
from diffjax.evaluate.tasks.needles import SEED_OFFSET, needle_items

NEEDLE_TAIL = 80  # characters of the needle prompt kept in results.json


def run(context: EvalContext) -> TaskResult:
    options, tokenizer, model = context.options.generation, context.tokenizer, context.model

    def continue_text(text: str, max_tokens: int, sampling: Sampling, use_cache: bool = True) -> Generation:
        prompt = encode_prompt(tokenizer, text)
        return generate(
            model.graphdef,
            model.params,
            prompt,
            max_tokens,
            sampling,
            seed=options.seed,
            stop_id=tokenizer.eos_id,
            use_cache=use_cache,
        )

    samples = []
    for text in options.prompts or (context.config.sample_prompt,):
        cached = continue_text(text, options.max_tokens, options.sampling)
        recomputed = continue_text(text, options.max_tokens, options.sampling, use_cache=False)
        tokens = until_stop(cached.tokens, tokenizer.eos_id)
        samples.append(
            {
                "prompt": text,
                "continuation": tokenizer.decode(tokens),
                "tokens": len(tokens),
                "cached_tokens_per_s": len(cached.tokens) / cached.decode_seconds,
                "recomputed_tokens_per_s": len(recomputed.tokens) / recomputed.decode_seconds,
                "cache_matches_recomputation": bool((cached.tokens == recomputed.tokens).all()),
            }
        )

    grid = context.options.needles
    item = needle_items(grid, tokenizer, context.config.data.needles.seed + SEED_OFFSET)[0]
    prompt = item.document.prompt_for(0)
    answer = item.document.answers[0]
    generated = tokenizer.decode(continue_text(prompt, len(item.spans[0].tokens), Sampling()).tokens)
    needle = {"prompt_tail": prompt[-NEEDLE_TAIL:], "expected": " " + answer, "generated": generated}
    figures = {
        "sampling": options.sampling._asdict(),
        "seed": options.seed,
        "max_tokens": options.max_tokens,
        "samples": samples,
        "needle": needle,
    }
    summary = {
        "cache == recomputation": "yes" if all(s["cache_matches_recomputation"] for s in samples) else "NO",
        "tokens/s (cache, recompute)": ", ".join(
            f"{s['cached_tokens_per_s']:,.0f} vs {s['recomputed_tokens_per_s']:,.0f}" for s in samples
        ),
        "needle (expected -> generated)": f"{needle['expected']!r} -> {generated!r}",
    }
    tables = tuple(f"generate {s['prompt']!r} ->\n{s['prompt']}{s['continuation']}" for s in samples)
    return TaskResult(figures, summary, tables)
