"""Benchmark CLI.

    python -m diffjax.bench data --config=configs/tiny.py [--batches=500] [--warmup=20]
    python -m diffjax.bench train_step --emb_dim=256 --num_layers=4 --num_heads=2 --num_kv_heads=2 \\
        --mlp_dim=640 --vocab_size=256 --seq_len=512 --batch_size=8 --steps=10 [--compare_hf | --hf_only]
    python -m diffjax.bench kernels [--lengths=1024,4096,16384] [--head_dims=64,128] [--kernel_heads=8] \\
        [--kernel_kv_heads=8] [--tokens=16384] [--iterations=20] [--warmup_steps=2] \\
        [--variants=fused,two_flash,four_dpa,blockwise] [--interpret | --aot_topology=v5e:2x2]
    python -m diffjax.bench accelerator --out=DIR [--budget_s=1200] [--quick] [--stages=kernels,train_step]
    python -m diffjax.bench harness --workdir=runs/tiny_diff [--hf=EXPORTED_DIR] [--count=200] [--harness_batch_size=16]
    python -m diffjax.bench checkpoint [--layers=4] [--repeats=3] [--storage=local,gcs] [--opt_state] \\
        [--config=configs/paper_830m.py]
    python -m diffjax.bench parity [--parity_variants=diff,diff_gqa,standard] [--parity_steps=100] \\
        [--config=configs/tiny.py]
    python -m diffjax.bench sweep --out=runs/sweep [--sweep_variants=diff,diff_nogain,standard] \\
        [--sweep_learning_rates=7.5e-4,1.5e-3,3e-3,6e-3] [--sweep_seeds=0,1,2] [--nosweep_evaluate] \\
        [--config=configs/tiny.py]

The last line printed is `key=value` pairs. For `data` and `train_step` the first is `tokens_per_s`; `train_step` adds
`peak_rss_mb`, and with `--compare_hf` ends the line with `hf_tokens_per_s` and `ratio` (diffjax / HF).
`--hf_only` times the Hugging Face model alone, so that its peak memory is its own.
`kernels` prints a table per (T, d) and ends with `key=value` pairs at the largest shape (fwd+bwd ms per
variant, `fused_speedup_fwd_bwd` over the best alternative); with `--aot_topology` it compiles instead of
timing and ends with `compiled`, `failed` and temp MiB per variant.
`accelerator` is the suite to run once on a new GPU/TPU (`diffjax.bench.accelerator`, docs/accelerator.md): it
writes `DIR/results.json` and `DIR/results.md`, prints a line per stage and exits 1 if a stage did not pass.
`harness` prints lm-evaluation-harness requests/s per request type for diffjax (compiling, then warm) and for
lm-eval's `hf` model on the export (`diffjax.bench.harness`), and ends with `key=value` pairs.
`checkpoint` saves and restores a paper model's parameters (paper_830m with `--layers` layers; `--opt_state` adds
AdamW's state) with Orbax to the local disk and to the Cloud Storage emulator (`diffjax.bench.checkpoint_io`,
the test extra), prints medians in a table and ends with `STORAGE_save_mb_s`, `STORAGE_restore_mb_s`, `bytes`.
`parity` trains transformers' initialisation of each variant in diffjax and in transformers on the same batches
(`diffjax.bench.parity`, the hf extra), prints both losses per step, a verdict per variant (step-0 validation
loss within 1e-5, the first 10 training losses within 1e-5 relative), ends with `VARIANT_eval_difference` and
`VARIANT_max_relative_10` pairs, and exits 1 if a variant failed.
`sweep` trains every variant x learning rate x seed into `--out/runs/` (`diffjax.bench.sweep`; the same command
resumes an interrupted sweep), writes `results.json`, `results.md` and `loss_vs_lr.png` into `--out`, evaluates
the best rate's run of each variant and compares them, and prints the results table last.
"""

import sys
from pathlib import Path

from absl import flags

from diffjax.bench.timing import run_alternating
from diffjax.cli import UsageError, run_main
from diffjax.evaluate.results import format_table
from diffjax.parallel.mesh import use_cpu_cores

BENCHMARKS = ("data", "train_step", "kernels", "accelerator", "harness", "checkpoint", "parity", "sweep")
_BATCHES = flags.DEFINE_integer("batches", 500, "data: batches to time.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "data: batches to draw before timing.")
_EMB_DIM = flags.DEFINE_integer("emb_dim", 256, "train_step: model width E.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "train_step: decoder layers.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 2, "train_step: differential heads H (Hugging Face counts 2H).")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "train_step: key/value heads in diffjax's units.")
_MLP_DIM = flags.DEFINE_integer("mlp_dim", 640, "train_step: SwiGLU width.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 256, "train_step: vocabulary size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "train_step: tokens per row T.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "train_step: rows per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "train_step: timed steps per framework (median reported).")
_WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", 2, "train_step, kernels: untimed steps (calls) first, after compilation."
)
_DTYPE = flags.DEFINE_string("dtype", "float32", "train_step: activation dtype.")
_ATTENTION_IMPL = flags.DEFINE_string("attention_impl", "auto", "train_step: auto, reference, blockwise, pallas.")
_COMPARE_HF = flags.DEFINE_bool("compare_hf", False, "train_step: also time HF DiffLlamaForCausalLM, alternating.")
_HF_ONLY = flags.DEFINE_bool("hf_only", False, "train_step: time HF DiffLlamaForCausalLM alone (its own memory).")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", True, "train_step: loop over layers (False unrolls them).")
_REMAT_POLICY = flags.DEFINE_string("remat_policy", "none", "train_step: none, minimal, full, save_attention.")
_LENGTHS = flags.DEFINE_list("lengths", ["1024", "4096", "16384"], "kernels: sequence lengths T.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "kernels: head widths d (V is 2d wide).")
_KERNEL_HEADS = flags.DEFINE_integer("kernel_heads", 8, "kernels: differential query heads H.")
_KERNEL_KV_HEADS = flags.DEFINE_integer("kernel_kv_heads", 8, "kernels: key/value heads (H for no GQA).")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "kernels: tokens per call; batch = max(1, tokens // T).")
_ITERATIONS = flags.DEFINE_integer("iterations", 20, "kernels: timed calls per variant and pass (median).")
_VARIANTS = flags.DEFINE_list("variants", ["fused", "two_flash", "four_dpa", "blockwise"], "kernels: variants to run.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "kernels: on CPU, time the Pallas variants interpreted.")
_AOT_TOPOLOGY = flags.DEFINE_string(
    "aot_topology", "", "kernels: compile for one device of this TPU topology (libtpu) instead of timing."
)

_OUT = flags.DEFINE_string(
    "out", None, "accelerator: a new (or empty) directory for its results; sweep: its directory (again: resume)."
)
_BUDGET_S = flags.DEFINE_float("budget_s", 1200, "accelerator: seconds for the whole suite, shared among the stages.")
_QUICK = flags.DEFINE_bool("quick", False, "accelerator: every stage at toy sizes (a CPU check of the suite itself).")
_STAGES = flags.DEFINE_list("stages", [], "accelerator: run only these stages (default: all, in order).")

_WORKDIR = flags.DEFINE_string("workdir", None, "harness: the run directory of the checkpoint to score.")
_HF = flags.DEFINE_string("hf", "", "harness: its Hugging Face export (default: exported to a temporary dir).")
_COUNT = flags.DEFINE_integer("count", 200, "harness: items per local task.")
_HARNESS_BATCH = flags.DEFINE_integer("harness_batch_size", 16, "harness: sequences per forward pass, both LMs.")

_LAYERS = flags.DEFINE_integer("layers", 4, "checkpoint: decoder layers of the model (paper_830m has 24).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "checkpoint: save/restore round trips per storage (median reported).")
_STORAGE = flags.DEFINE_list("storage", ["local", "gcs"], "checkpoint: local (a temporary dir), gcs (the emulator).")
_OPT_STATE = flags.DEFINE_bool("opt_state", False, "checkpoint: save AdamW's state too (3x the bytes).")

_VARIANTS_PARITY = flags.DEFINE_list("parity_variants", ["diff", "diff_gqa", "standard"], "parity: models to compare.")
_PARITY_STEPS = flags.DEFINE_integer("parity_steps", 100, "parity: training steps per framework.")
_SWEEP_VARIANTS = flags.DEFINE_list("sweep_variants", ["diff", "diff_nogain", "standard"], "sweep: models.")
_SWEEP_RATES = flags.DEFINE_list(
    "sweep_learning_rates", ["7.5e-4", "1.5e-3", "3e-3", "6e-3"], "sweep: peak learning rates."
)
_SWEEP_SEEDS = flags.DEFINE_list("sweep_seeds", ["0", "1", "2"], "sweep: seeds (initialisation and data order).")
_SWEEP_EVALUATE = flags.DEFINE_bool("sweep_evaluate", True, "sweep: evaluate every seed at each variant's best rate.")


def bench_data() -> None:
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


def bench_train_step() -> None:
    if _STEPS.value <= 0 or _WARMUP_STEPS.value < 0:
        raise UsageError("--steps must be positive and --warmup_steps >= 0")
    if _COMPARE_HF.value and _HF_ONLY.value:
        raise UsageError("--compare_hf and --hf_only exclude each other")
    from diffjax.bench import train_step as bench

    shape = bench.Shape(
        emb_dim=_EMB_DIM.value,
        num_layers=_NUM_LAYERS.value,
        num_heads=_NUM_HEADS.value,
        num_kv_heads=_NUM_KV_HEADS.value,
        mlp_dim=_MLP_DIM.value,
        vocab_size=_VOCAB_SIZE.value,
        seq_len=_SEQ_LEN.value,
        batch_size=_BATCH_SIZE.value,
        dtype=_DTYPE.value,
        attention_impl=_ATTENTION_IMPL.value,
        scan_layers=_SCAN_LAYERS.value,
        remat_policy=_REMAT_POLICY.value,
    )
    bench.bench_config(shape)  # a bad shape fails here, before anything is built
    steps = {}
    if not _HF_ONLY.value:
        use_cpu_cores((-1, 1, 1), shape.batch_size)  # data-parallel over the cores (before the backend starts)
        steps["diffjax"] = bench.diffjax_step(shape)
    if _COMPARE_HF.value or _HF_ONLY.value:
        from diffjax.bench.hf import hf_step

        steps["hf"] = hf_step(shape)
    seconds = run_alternating(steps, _WARMUP_STEPS.value, _STEPS.value)
    rates = {name: bench.median_tokens_per_s(times, shape) for name, times in seconds.items()}
    print(
        f"train_step: E={shape.emb_dim} layers={shape.num_layers} H={shape.num_heads} Hkv={shape.num_kv_heads} "
        f"mlp={shape.mlp_dim} vocab={shape.vocab_size} batch {shape.batch_size} x {shape.seq_len} {shape.dtype}, "
        f"attention_impl={shape.attention_impl} scan_layers={shape.scan_layers} remat={shape.remat_policy}, "
        f"median of {_STEPS.value} steps"
    )
    if "diffjax" in steps:
        print(f"diffjax: data-parallel over {bench.data_parallel_devices(shape.batch_size)} device(s)")
    for name, times in seconds.items():
        print(f"{name}: tokens_per_s={rates[name]:.6g} step_s min={min(times):.4g} max={max(times):.4g}")
    last = f"tokens_per_s={next(iter(rates.values())):.6g} peak_rss_mb={bench.peak_rss_mb():.6g}"
    if len(rates) == 2:
        last += f" hf_tokens_per_s={rates['hf']:.6g} ratio={rates['diffjax'] / rates['hf']:.6g}"
    print(last)


def bench_kernels() -> None:
    if _ITERATIONS.value <= 0 or _WARMUP_STEPS.value < 0:
        raise UsageError("--iterations must be positive and --warmup_steps >= 0")
    if _INTERPRET.value and _AOT_TOPOLOGY.value:
        raise UsageError("--interpret and --aot_topology exclude each other")
    from diffjax.bench import kernels

    try:
        lengths, head_dims = [int(x) for x in _LENGTHS.value], [int(x) for x in _HEAD_DIMS.value]
    except ValueError as error:
        raise UsageError(f"--lengths and --head_dims take integers: {error}") from None
    shapes = kernels.shapes(lengths, head_dims, _KERNEL_HEADS.value, _KERNEL_KV_HEADS.value, _TOKENS.value)
    variants = kernels.check_variants(_VARIANTS.value)
    if _AOT_TOPOLOGY.value:
        from diffjax.train.aot import topology_devices

        devices = topology_devices(_AOT_TOPOLOGY.value)
        kernels.run_compile(shapes, variants, _AOT_TOPOLOGY.value, devices)
    else:
        kernels.run(shapes, variants, _WARMUP_STEPS.value, _ITERATIONS.value, _INTERPRET.value)


def bench_accelerator() -> None:
    from diffjax.bench import accelerator

    if not _OUT.value:
        raise UsageError("--out is required: a new directory for results.json and results.md")
    budget = accelerator.QUICK_BUDGET_S if _QUICK.value and not _BUDGET_S.present else _BUDGET_S.value
    if not budget > 0:
        raise UsageError(f"--budget_s={_BUDGET_S.value} must be a positive number of seconds")
    stages = accelerator.select(_STAGES.value)
    out = Path(_OUT.value).expanduser().resolve()
    accelerator.check_out_dir(out)
    report = accelerator.run_suite(out, budget, _QUICK.value, stages, ["python -m diffjax.bench", *sys.argv[1:]])
    print(f"results: {out / 'results.md'} and results.json")
    if any(stage["status"] != "passed" for stage in report["stages"].values()):
        sys.exit(1)


def bench_harness() -> None:
    from diffjax.bench.harness import LMS, REQUEST_TYPES, benchmark_harness

    if not _WORKDIR.value:
        raise UsageError("--workdir is required: a run directory with a checkpoint")
    if _COUNT.value < 1 or _HARNESS_BATCH.value < 1:
        raise UsageError("--count and --harness_batch_size must be at least 1")
    hf = Path(_HF.value).expanduser() if _HF.value else None
    rates = benchmark_harness(Path(_WORKDIR.value).expanduser(), hf, _COUNT.value, _HARNESS_BATCH.value)
    rows = [[kind, str(rates["requests"][kind]), *(f"{rates[lm][kind]:,.1f}" for lm in LMS)] for kind in REQUEST_TYPES]
    print(format_table(["request type", "requests", *(f"{lm} req/s" for lm in LMS)], rows))
    pairs = {f"{lm}_{kind}": rates[lm][kind] for lm in LMS for kind in REQUEST_TYPES}
    pairs |= {f"ratio_warm_{kind}": rates["diffjax_warm"][kind] / rates["hf"][kind] for kind in REQUEST_TYPES}
    print(" ".join(f"{key}={value:.4g}" for key, value in pairs.items()))


def bench_checkpoint() -> None:
    from diffjax.bench.checkpoint_io import run

    run(flags.FLAGS.config, _LAYERS.value, _REPEATS.value, _STORAGE.value, _OPT_STATE.value)


def bench_parity() -> None:
    from diffjax.bench import parity
    from diffjax.config import base_config

    if _PARITY_STEPS.value < parity.CHECKED_STEPS:
        raise UsageError(f"--parity_steps={_PARITY_STEPS.value} must be at least {parity.CHECKED_STEPS}")
    config = flags.FLAGS.config or base_config()  # the default: configs/tiny.py's model and data
    for variant in _VARIANTS_PARITY.value:
        parity.variant_config(config, variant)  # bad input fails before anything is trained
    comparisons = [parity.compare(config, variant, _PARITY_STEPS.value) for variant in _VARIANTS_PARITY.value]
    print(parity.report(comparisons))
    pairs = {}
    for c in comparisons:
        pairs |= {
            f"{c.variant}_eval_difference": c.eval_difference,
            f"{c.variant}_max_relative_10": c.relative_differences()[: parity.CHECKED_STEPS].max(),
        }
    print(" ".join(f"{key}={value:.3g}" for key, value in pairs.items()))
    if not all(c.passed for c in comparisons):
        sys.exit(1)


def bench_sweep() -> None:
    from diffjax.bench import sweep
    from diffjax.config import base_config

    if not _OUT.value:
        raise UsageError("--out is required: the sweep's directory (the same command resumes it)")
    try:
        rates, seeds = [float(x) for x in _SWEEP_RATES.value], [int(x) for x in _SWEEP_SEEDS.value]
    except ValueError as error:
        raise UsageError(f"--sweep_learning_rates takes numbers and --sweep_seeds integers: {error}") from None
    if not (rates and seeds and _SWEEP_VARIANTS.value):
        raise UsageError("--sweep_variants, --sweep_learning_rates and --sweep_seeds need at least one value each")
    config = flags.FLAGS.config or base_config()  # the default: configs/tiny.py's model and data
    use_cpu_cores(config.mesh.shape, config.batch_size // config.grad_accum_steps)  # as train.py does
    out = Path(_OUT.value).expanduser()
    summary = sweep.sweep(config, _SWEEP_VARIANTS.value, rates, seeds, out, evaluate=_SWEEP_EVALUATE.value)
    print(sweep.markdown(summary, len(seeds)))


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        raise UsageError(f"name one benchmark: {', '.join(BENCHMARKS)} (got {argv[1:]})")
    benchmarks = {
        "data": bench_data,
        "train_step": bench_train_step,
        "kernels": bench_kernels,
        "accelerator": bench_accelerator,
        "harness": bench_harness,
        "checkpoint": bench_checkpoint,
        "parity": bench_parity,
        "sweep": bench_sweep,
    }
    benchmarks[argv[1]]()


if __name__ == "__main__":
    run_main("python -m diffjax.bench", main)
