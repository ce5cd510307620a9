"""Differential-attention cores head to head: the fused Pallas kernel against what one would write without it.

Why: the fused kernel (`diffjax.ops.pallas.diff_attention`) exists to beat the alternatives, so it is timed
against them on the same causal bfloat16 problem, `(A1 - lam A2) V` on `[B, T, H, d]` queries:

- `fused`: one kernel, both softmaxes in one pass over K/V (SPEC section 5);
- `two_flash`: two calls of the one-branch Pallas flash kernel with V of width 2d, `o1 - lam o2`;
- `four_dpa`: four `jax.nn.dot_product_attention` calls (it needs V as wide as K, so V is split into its
  two d-wide halves), cuDNN on GPU, the XLA implementation elsewhere;
- `blockwise`: the XLA blockwise core (`diffjax.ops.blockwise`, the dispatcher's tiles).

Each variant is timed forward only and forward+backward (`jax.grad` of `sum(out * cotangent)` with respect
to q1, q2, k1, k2, v and lam), all variants of a shape interleaved round by round, median reported.

FLOPs. Every variant's TFLOP/s share ONE numerator, the useful work of causal differential attention, so a
ratio of TFLOP/s is a ratio of speeds: per head and batch row, forward 6 and backward 14 units of T^2 d
multiply-adds (SPEC section 5: two `QK^T` of width d and two `PV` of width 2d; the fused backward),
x2 FLOPs per multiply-add, /2 for causality: `units * T^2 * d * H * B` FLOPs. Variants that do more work
(two flash calls: 26 units, four calls: 36; XLA without causal skipping: twice that) get no credit for it.

Pallas kernels only run interpreted on CPU (timings meaningless), so there they are skipped unless asked
for. `compile_for_topology` instead compiles every variant's forward+backward for one device of a TPU
topology (libtpu, no TPU needed) and reports the compiler's verdict, temporary memory and FLOP estimate.
"""

import math
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffjax.bench.timing import run_alternating
from diffjax.cli import UsageError
from diffjax.ops import blockwise, pallas
from diffjax.ops.dispatch import BLOCKWISE_BLOCK

VARIANTS = ("fused", "two_flash", "four_dpa", "blockwise")
PALLAS_VARIANTS = ("fused", "two_flash")
UNITS = {"fwd": 6, "fwd_bwd": 20}  # useful multiply-adds per head, in T^2 d (SPEC section 5)
DTYPE = jnp.bfloat16
LAMBDA = 0.8
# Tile sizes a sweep combines: Triton's useful range on GPUs, lane multiples on TPUs, two toy sizes interpreted.
TILE_SIZES = {"gpu": (32, 64, 128), "tpu": (128, 256, 512), "cpu": (32, 64)}

Core = Callable[..., jax.Array]  # (q1, q2, k1, k2, v, lam) -> out


class Shape(NamedTuple):
    """One benchmarked problem: B rows of T tokens, H differential query heads, Hkv key/value heads, width d."""

    batch: int
    length: int
    heads: int
    kv_heads: int
    head_dim: int

    def describe(self) -> str:
        return (
            f"T={self.length} d={self.head_dim}: batch {self.batch}, H={self.heads}, Hkv={self.kv_heads}, "
            f"{jnp.dtype(DTYPE).name}, causal"
        )


class Result(NamedTuple):
    """A variant's outcome on one shape: median seconds per pass, or compile figures, or the error line."""

    fwd_s: float = 0.0
    fwd_bwd_s: float = 0.0
    temp_bytes: int = 0
    flops: float | None = None
    compile_s: float = 0.0
    error: str = ""


def shapes(lengths: list[int], head_dims: list[int], heads: int, kv_heads: int, tokens: int) -> list[Shape]:
    """Every (T, d), ascending, with `batch = max(1, tokens // T)` so each length moves the same tokens."""
    for name, values in (("lengths", lengths), ("head_dims", head_dims), ("tokens", [tokens])):
        if not values or min(values) <= 0:
            raise UsageError(f"--{name} must be positive integers, got {values}")
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise UsageError(f"--kernel_heads={heads} must be a positive multiple of --kernel_kv_heads={kv_heads}")
    return [
        Shape(max(1, tokens // length), length, heads, kv_heads, dim)
        for length in sorted(lengths)
        for dim in sorted(head_dims)
    ]


def check_variants(names: list[str]) -> list[str]:
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise UsageError(f"--variants must name some of {', '.join(VARIANTS)}, got {names}")
    return [name for name in VARIANTS if name in names]


def useful_flops(shape: Shape, backward: bool) -> float:
    """FLOPs of causal differential attention, forward (6 units) or forward+backward (6 + 14): see the docstring."""
    units = UNITS["fwd_bwd" if backward else "fwd"]
    return units * shape.length**2 * shape.head_dim * shape.heads * shape.batch


def core(variant: str, platform: str, head_dim: int, interpret: bool, tiles: tuple[int, int] = (0, 0)) -> Core:
    """The differential-attention function `variant` runs on `platform` (`cpu`, `gpu`, `tpu`); `tiles` are the
    Pallas variants' `(block_q, block_k)`, zeros for the kernel family's defaults."""
    if variant in PALLAS_VARIANTS:
        kernel = pallas.kernel_for(platform, head_dim, DTYPE, *tiles, interpret=interpret)
        if variant == "fused":
            return lambda q1, q2, k1, k2, v, lam: pallas.diff_attention(q1, q2, k1, k2, v, lam, kernel=kernel)
        return _combined(lambda q, k, v: pallas.attention(q, k, v, kernel=kernel))
    if variant == "blockwise":
        tiles = {"block_q": BLOCKWISE_BLOCK, "block_k": BLOCKWISE_BLOCK}
        return lambda q1, q2, k1, k2, v, lam: blockwise.diff_attention(q1, q2, k1, k2, v, lam, **tiles)
    implementation = "cudnn" if platform == "gpu" else "xla"

    def split(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        halves = jnp.split(v, 2, axis=-1)
        outs = [jax.nn.dot_product_attention(q, k, h, is_causal=True, implementation=implementation) for h in halves]
        return jnp.concatenate(outs, axis=-1)

    return _combined(split)


def _combined(attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]) -> Core:
    """`attend(q1, k1, v) - lam attend(q2, k2, v)`, combined in float32."""

    def diff(q1, q2, k1, k2, v, lam):
        out1, out2 = attend(q1, k1, v).astype(jnp.float32), attend(q2, k2, v).astype(jnp.float32)
        return (out1 - lam.astype(jnp.float32) * out2).astype(v.dtype)

    return diff


def passes(fn: Core) -> tuple[Callable, Callable]:
    """Jitted forward `(q1, q2, k1, k2, v, lam) -> out` and forward+backward `(..., cotangent) -> 6 gradients`."""

    def loss(q1, q2, k1, k2, v, lam, cotangent):
        return jnp.sum(fn(q1, q2, k1, k2, v, lam).astype(jnp.float32) * cotangent.astype(jnp.float32))

    return jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))


def _widths(shape: Shape) -> list[tuple[int, ...]]:
    """Shapes of q1, q2, k1, k2, v, lam and the output cotangent."""
    b, t, h, g, d = shape
    return [(b, t, h, d)] * 2 + [(b, t, g, d)] * 2 + [(b, t, g, 2 * d), (), (b, t, h, 2 * d)]


def inputs(shape: Shape, seed: int = 0) -> list[jax.Array]:
    """Random bfloat16 q1, q2, k1, k2, v, lam = 0.8 and the cotangent, on the default device."""
    keys = jax.random.split(jax.random.key(seed), 7)
    arrays = [jax.random.normal(key, dims, DTYPE) for key, dims in zip(keys, _widths(shape), strict=True)]
    arrays[5] = jnp.asarray(LAMBDA, DTYPE)
    return arrays


def _one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def time_shape(
    shape: Shape,
    variants: list[str],
    platform: str,
    interpret: bool,
    warmup: int,
    iterations: int,
    tiles: tuple[int, int] = (0, 0),
) -> dict[str, Result]:
    """Median seconds of each variant's forward and forward+backward, interleaved; a failure is kept as its
    error line so that one variant the platform cannot run (memory, cuDNN limits) does not lose the table."""
    args = inputs(shape)
    steps, errors = {}, {}
    for variant in variants:
        forward, gradients = passes(core(variant, platform, shape.head_dim, interpret, tiles))
        pair = {
            (variant, "fwd"): lambda f=forward: jax.block_until_ready(f(*args[:6])),
            (variant, "fwd_bwd"): lambda g=gradients: jax.block_until_ready(g(*args)),
        }
        try:  # the first calls compile; anything the variant cannot do surfaces here
            for step in pair.values():
                step()
        except Exception as error:  # reported in the table, never hidden
            errors[variant] = Result(error=_one_line(error))
            continue
        steps.update(pair)
    seconds = run_alternating(steps, warmup, iterations)
    medians = {key: statistics.median(times) for key, times in seconds.items()}
    return {
        variant: errors.get(variant) or Result(medians[variant, "fwd"], medians[variant, "fwd_bwd"])
        for variant in variants
    }


def compile_shape(shape: Shape, variants: list[str], device: jax.Device) -> dict[str, Result]:
    """Compile each variant's forward+backward for `device` (a TPU topology's); memory and FLOPs, or the error."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    structs = [jax.ShapeDtypeStruct(dims, DTYPE, sharding=sharding) for dims in _widths(shape)]
    results = {}
    for variant in variants:
        start = time.perf_counter()
        try:  # a kernel the compiler rejects is the finding, reported as its first line
            compiled = passes(core(variant, device.platform, shape.head_dim, False))[1].lower(*structs).compile()
        except Exception as error:
            results[variant] = Result(error=_one_line(error), compile_s=time.perf_counter() - start)
            continue
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        results[variant] = Result(
            temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
            flops=(cost or {}).get("flops"),
            compile_s=time.perf_counter() - start,
        )
    return results


def _label(variant: str, interpret: bool) -> str:
    return f"{variant} (interpreted)" if interpret and variant in PALLAS_VARIANTS else variant


def timing_table(shape: Shape, results: dict[str, Result], interpret: bool) -> list[str]:
    """Markdown rows: times, TFLOP/s (the shared numerator) and the fused kernel's speedup over each variant."""
    rows = [
        "| variant | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | fused speedup fwd | fused speedup fwd+bwd |",
        "|---|---|---|---|---|---|---|",
    ]
    fused = results.get("fused")
    fused = fused if fused and not fused.error else None
    for variant, result in results.items():
        if result.error:
            rows.append(f"| {variant} | failed: {result.error} | | | | | |")
            continue
        cells = [f"{result.fwd_s * 1e3:.4g}", f"{result.fwd_bwd_s * 1e3:.4g}"]
        cells += [f"{useful_flops(shape, False) / result.fwd_s / 1e12:.4g}"]
        cells += [f"{useful_flops(shape, True) / result.fwd_bwd_s / 1e12:.4g}"]
        if fused:
            cells += [f"{result.fwd_s / fused.fwd_s:.3g}x", f"{result.fwd_bwd_s / fused.fwd_bwd_s:.3g}x"]
        else:
            cells += ["-", "-"]
        rows.append(f"| {_label(variant, interpret)} | {' | '.join(cells)} |")
    best = best_alternative(results)
    if fused and best:
        rows.append(
            f"fused vs best alternative ({best}): fwd {results[best].fwd_s / fused.fwd_s:.3g}x, "
            f"fwd+bwd {results[best].fwd_bwd_s / fused.fwd_bwd_s:.3g}x"
        )
    return rows


def best_alternative(results: dict[str, Result]) -> str | None:
    """The non-fused variant with the fastest forward+backward, or None."""
    measured = {v: r for v, r in results.items() if v != "fused" and not r.error}
    return min(measured, key=lambda v: measured[v].fwd_bwd_s) if measured else None


def timing_summary(shape: Shape, results: dict[str, Result]) -> str:
    """The last line: `key=value` pairs at `shape` (the largest measured)."""
    pairs = {"seq_len": shape.length, "head_dim": shape.head_dim}
    pairs.update({f"{v}_fwd_bwd_ms": r.fwd_bwd_s * 1e3 for v, r in results.items() if not r.error})
    best = best_alternative(results)
    if "fused_fwd_bwd_ms" in pairs and best:
        pairs["fused_speedup_fwd_bwd"] = results[best].fwd_bwd_s / results["fused"].fwd_bwd_s
    return " ".join(f"{key}={value:.6g}" for key, value in pairs.items())


def compile_table(results: dict[str, Result]) -> list[str]:
    """Markdown rows: compiled or the compiler's error, temporary memory, XLA's FLOP estimate, compile time."""
    rows = ["| variant | fwd+bwd compiles | temp MiB | XLA flops | compile s |", "|---|---|---|---|---|"]
    for variant, result in results.items():
        verdict = f"no: {result.error}" if result.error else "yes"
        temp = "-" if result.error else f"{result.temp_bytes / 2**20:.4g}"
        flops = "-" if result.flops is None else f"{result.flops:.4g}"
        rows.append(f"| {variant} | {verdict} | {temp} | {flops} | {result.compile_s:.3g} |")
    return rows


def compile_summary(all_results: list[dict[str, Result]]) -> str:
    """The last line: how many compilations succeeded and failed, and temp MiB per variant at the last shape."""
    flat = [r for results in all_results for r in results.values()]
    pairs = {"compiled": sum(not r.error for r in flat), "failed": sum(bool(r.error) for r in flat)}
    pairs.update({f"{v}_temp_mib": r.temp_bytes / 2**20 for v, r in all_results[-1].items() if not r.error})
    return " ".join(f"{key}={value:.6g}" for key, value in pairs.items())


def run(
    shape_list: list[Shape], variants: list[str], warmup: int, iterations: int, interpret: bool
) -> list[tuple[Shape, dict[str, Result]]]:
    """Time every shape on the default backend and print a table per shape, the `key=value` line last."""
    platform = jax.default_backend()
    if platform == "cpu" and not interpret:
        skipped = [v for v in variants if v in PALLAS_VARIANTS]
        if skipped:
            print(
                f"skipped {', '.join(skipped)}: Pallas kernels only run interpreted on CPU (timings meaningless); "
                "--interpret times them anyway"
            )
        variants = [v for v in variants if v not in PALLAS_VARIANTS]
    if not variants:
        raise UsageError("no variant left to time on CPU; add four_dpa or blockwise, or pass --interpret")
    print(f"kernels on {platform} ({jax.devices()[0].device_kind}): median of {iterations} after {warmup} warm-up")
    if interpret:
        print("Pallas variants run in the interpreter: their times say nothing about kernel speed")
    measured = []
    for shape in shape_list:
        measured.append((shape, time_shape(shape, variants, platform, interpret, warmup, iterations)))
        print(shape.describe())
        print("\n".join(timing_table(shape, measured[-1][1], interpret)))
    print(timing_summary(*measured[-1]))
    return measured


def tile_candidates(platform: str) -> list[tuple[int, int]]:
    """`(block_q, block_k)` pairs a tile sweep of the fused kernel tries on `platform` (CPU: interpreted)."""
    sizes = TILE_SIZES[platform]
    return [(q, k) for q in sizes for k in sizes]


def sweep_tiles(
    shape: Shape,
    candidates: list[tuple[int, int]],
    platform: str,
    interpret: bool,
    warmup: int,
    iterations: int,
    deadline: float = math.inf,
) -> dict[tuple[int, int], Result]:
    """The fused kernel's median times for each `(block_q, block_k)` candidate at `shape`, one compilation
    each; pairs the compiler rejects (registers, shared memory) keep their error line. Stops once
    `time.time()` passes `deadline`, returning what it measured."""
    results = {}
    for tiles in candidates:
        if time.time() > deadline:
            break
        results[tiles] = time_shape(shape, ["fused"], platform, interpret, warmup, iterations, tiles)["fused"]
    return results


def run_compile(shape_list: list[Shape], variants: list[str], topology: str, devices: list) -> None:
    """Compile every shape's variants for one device of `topology`; a table per shape, `key=value` last."""
    print(f"kernels compiled for one device of {topology} ({devices[0].device_kind}); forward+backward, no timing")
    all_results = []
    for shape in shape_list:
        all_results.append(compile_shape(shape, variants, devices[0]))
        print(shape.describe())
        print("\n".join(compile_table(all_results[-1])))
    print(compile_summary(all_results))
