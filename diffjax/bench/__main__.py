"""Benchmark CLI.

    python -m diffjax.bench data --config=configs/tiny.py [--batches=500] [--warmup=20]

The last line printed is `key=value` pairs, the first of them `tokens_per_s`.
"""

from absl import flags

from diffjax.cli import UsageError, run_main

BENCHMARKS = ("data",)
_BATCHES = flags.DEFINE_integer("batches", 500, "Batches to time.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Batches to draw before timing.")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        raise UsageError(f"name one benchmark: {', '.join(BENCHMARKS)} (got {argv[1:]})")
    if _BATCHES.value <= 0 or _WARMUP.value < 0:
        raise UsageError("--batches must be positive and --warmup >= 0")
    from diffjax.bench.data import benchmark_data

    config = flags.FLAGS.config
    result = benchmark_data(config, _BATCHES.value, _WARMUP.value)
    print(
        f"data pipeline: {config.data.source or config.data.mixture}, {config.data.packing} packing, "
        f"{config.data.prefetch} prefetch, batch {config.batch_size} x {config.seq_len}"
    )
    print(" ".join(f"{key}={value:.6g}" for key, value in result.items()))


if __name__ == "__main__":
    run_main("python -m diffjax.bench", main)
