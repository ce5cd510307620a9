"""The stages of `python -m diffjax.bench accelerator`, each run by `diffjax.bench.accelerator` in a process of
its own:

    python -m diffjax.bench.stages NAME OUT_DIR DEADLINE QUICK PLATFORM

A stage records its figures in `OUT_DIR/stages/NAME.json` as it goes (`StageLog`), so a stage killed at its
limit still leaves what it measured, and ends with a verdict: passed, or failed and why. `DEADLINE` is a
`time.time()` by which it should stop on its own; `QUICK` (0/1) asks for toy sizes; `PLATFORM` is what the
environment stage found (empty for that stage itself), so that child processes (pytest, train.py) are put on
the same device. Stages that start child processes touch no device before them (importing JAX does not):
a process holding the GPU would leave them little memory.
"""

import json
import math
import os
import platform as python_platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from diffjax.bench import kernels as kernel_bench
from diffjax.bench.timing import timed
from diffjax.bench.train_step import compiled_step
from diffjax.config import load_config_file, model_config
from diffjax.files import write_atomically
from diffjax.model import DiffTransformer
from diffjax.ops import pallas
from diffjax.ops.dispatch import resolve
from diffjax.train.checkpoint import installed_version
from diffjax.train.flops import peak_tflops, training_flops_per_token

REPO = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorflow-datasets",
    "ml-collections",
    "numpy",
    "libtpu",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
)
TARGETS = {  # issue 16's targets on the H200; checked wherever the stage runs on a GPU
    "fused_speedup_fwd_bwd_t4096_d128": 1.3,
    "mfu": 0.40,
    "diff_overhead": 0.05,
}
REMAT_ORDER = ("none", "minimal", "save_attention", "full")  # fastest first: the first that fits is taken


class StageLog:
    """A stage's results, rewritten to its JSON file after every change; the stage's deadline."""

    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline = path, deadline
        self.record: dict = {"results": {}}

    @property
    def results(self) -> dict:
        return self.record["results"]

    def set(self, key: str, value) -> None:
        self.results[key] = value
        self._write()

    def add_row(self, table: str, row: dict) -> None:
        self.results.setdefault(table, []).append(row)
        self._write()

    def finish(self, passed: bool, reason: str = "") -> None:
        self.record["verdict"] = {"passed": passed, "reason": reason}
        self._write()

    def out_of_time(self, reason: str) -> None:
        """The stage stopped at its deadline; what it recorded so far stands."""
        self.record["verdict"] = {"passed": False, "reason": reason, "timed_out": True}
        self._write()

    def fail(self, error: str) -> None:
        self.record["error"] = error
        self._write()

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def _write(self) -> None:
        write_atomically(self.path, json.dumps(self.record, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    """NumPy scalars and other odd leaves as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def jax_platforms(platform: str) -> dict[str, str]:
    """Environment that puts a child process on `platform` (the conftest defaults tests to CPU otherwise)."""
    return {"JAX_PLATFORMS": {"gpu": "cuda"}.get(platform, platform)} if platform else {}


# ----------------------------------------------------------------------------------------------- environment


def environment(log: StageLog, quick: bool, platform: str) -> None:
    """Versions, the devices and their memory, and what `attention_impl=auto` picks for them."""
    log.set("python", python_platform.python_version())
    log.set("versions", {name: installed_version(name) for name in DISTRIBUTIONS})
    devices = jax.devices()
    platform = jax.default_backend()
    stats = devices[0].memory_stats() or {}
    memory = stats.get("bytes_limit")
    log.set("platform", platform)
    log.set(
        "devices",
        {
            "kind": devices[0].device_kind,
            "count": len(devices),
            "processes": jax.process_count(),
            "memory_gib": round(memory / 2**30, 2) if memory else "not reported",
        },
    )
    for dtype in ("bfloat16", "float32"):
        impl = resolve("auto", jnp.dtype(dtype), platform)
        row = {"dtype": dtype, "attention_impl": impl}
        if impl == "pallas":
            for width in (64, 128):
                kernel = pallas.kernel_for(platform, width, jnp.dtype(dtype))
                row[f"tiles d={width}"] = f"{kernel.block_q}x{kernel.block_k}"
        log.add_row("dispatch", row)
    log.set("pallas_gpu_backend", "triton" if "gpu" in pallas.KERNELS else "unavailable in this jax")
    log.finish(True)


# ----------------------------------------------------------------------------------------------- correctness


def correctness(log: StageLog, quick: bool, platform: str) -> None:
    """`pytest -m accelerator` on the device: compiled kernels (on CPU: interpreted) against the reference,
    forward and gradients, and train steps of a small model against `attention_impl=reference`."""
    tests = REPO / "tests"
    if not tests.is_dir():
        log.finish(False, f"{tests} not found: run the suite from a clone of the repository")
        return
    report = log.path.with_suffix(".junit.xml")
    # --quick checks the stage itself on two tests of the selection; the CPU suite runs all of it anyway.
    selection = ["-m", "accelerator", str(tests)]
    if quick:
        selection = [
            "-m",
            "accelerator",
            "-k",
            "standard_attention or padding_rows",
            str(tests / "ops" / "test_pallas.py"),
        ]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *selection]
    env = {**os.environ, **jax_platforms(platform)}
    try:
        result = subprocess.run(command, cwd=REPO, env=env, timeout=max(log.seconds_left(), 1), text=True)
        code = result.returncode
    except subprocess.TimeoutExpired:
        code = None
    cases = _junit_cases(report) if report.exists() else []
    counts = {outcome: sum(case["outcome"] == outcome for case in cases) for outcome in ("passed", "failed", "skipped")}
    log.set("selection", " ".join(selection).replace(f"{REPO}/", ""))
    log.set("counts", counts)
    log.set("slowest", sorted(cases, key=lambda case: -case["seconds"])[:5])
    failed = [case for case in cases if case["outcome"] == "failed"]
    if failed:
        log.set("failed", failed)
    if code is None:
        log.out_of_time(f"pytest stopped at the deadline ({counts['passed']} passed, {len(failed)} failed by then)")
    elif code != 0 or not counts["passed"]:
        log.finish(False, f"pytest exit code {code}: {len(failed)} failed, {counts['passed']} passed")
    else:
        log.finish(True)


def _junit_cases(path: Path) -> list[dict]:
    """Every test case of a pytest JUnit XML report: name, outcome, seconds and the failure's first line."""
    cases = []
    for case in ElementTree.parse(path).iter("testcase"):
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if problem is None else ("skipped" if problem.tag == "skipped" else "failed")
        row = {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome}
        row["seconds"] = round(float(case.get("time", 0)), 2)
        if outcome == "failed":
            message = (problem.get("message") or "").strip()
            row["message"] = message.splitlines()[0][:200] if message else ""
        cases.append(row)
    return cases


# ----------------------------------------------------------------------------------------------- kernels


def kernels(log: StageLog, quick: bool, platform: str) -> None:
    """`bench kernels` over T x d (bfloat16, forward and forward+backward, every variant), then a sweep of the
    fused kernel's tiles at the middle length; on CPU the Pallas variants run interpreted."""
    platform = jax.default_backend()
    interpret = platform == "cpu"
    if quick:
        lengths, widths, heads, tokens, iterations, sweep_length = [128], [16], 2, 256, 2, 128
    else:
        lengths, widths, heads, tokens, iterations, sweep_length = [1024, 4096, 16384], [64, 128], 8, 16384, 10, 4096
    log.set("setup", {"heads": heads, "kv_heads": heads, "tokens_per_call": tokens, "iterations": iterations})
    fused_ran = True
    for shape in kernel_bench.shapes(lengths, widths, heads, heads, tokens):
        if log.seconds_left() < 0:
            log.out_of_time(f"deadline reached before T={shape.length} d={shape.head_dim}")
            return
        results = kernel_bench.time_shape(shape, list(kernel_bench.VARIANTS), platform, interpret, 2, iterations)
        fused_ran &= not results["fused"].error
        best = kernel_bench.best_alternative(results)
        for variant, result in results.items():
            log.add_row("kernels", _kernel_row(shape, variant, result, results))
        if best and not results["fused"].error:
            speedup = results[best].fwd_bwd_s / results["fused"].fwd_bwd_s
            log.add_row("fused_vs_best", {"T": shape.length, "d": shape.head_dim, "best": best, "speedup": speedup})
            if (shape.length, shape.head_dim) == (4096, 128):
                _target(log, "fused_speedup_fwd_bwd_t4096_d128", speedup, platform)
    for width in widths:
        if log.seconds_left() < 0:
            log.out_of_time(f"deadline reached before the tile sweep at d={width}")
            return
        shape = kernel_bench.Shape(max(1, tokens // sweep_length), sweep_length, heads, heads, width)
        default = pallas.kernel_for(platform, width, kernel_bench.DTYPE)
        candidates = kernel_bench.tile_candidates(platform)
        if quick:  # square tiles only: two interpreted compilations instead of four
            candidates = [(block_q, block_k) for block_q, block_k in candidates if block_q == block_k]
        sweep = kernel_bench.sweep_tiles(shape, candidates, platform, interpret, 2, iterations, log.deadline)
        for (block_q, block_k), result in sweep.items():
            row = {"T": sweep_length, "d": width, "block_q": block_q, "block_k": block_k}
            row |= {"fwd_ms": result.fwd_s * 1e3, "fwd_bwd_ms": result.fwd_bwd_s * 1e3, "error": result.error}
            row["default"] = (block_q, block_k) == (default.block_q, default.block_k)
            log.add_row("tile_sweep", row)
        timed = {tiles: r for tiles, r in sweep.items() if not r.error}
        if timed:
            winner = min(timed, key=lambda tiles: timed[tiles].fwd_bwd_s)
            default_result = timed.get((default.block_q, default.block_k))
            gain = default_result.fwd_bwd_s / timed[winner].fwd_bwd_s if default_result else None
            log.add_row("tile_winner", {"d": width, "block_q": winner[0], "block_k": winner[1], "vs_default": gain})
    if fused_ran:
        log.finish(True)
    else:
        log.finish(False, "the fused kernel failed on some shape (see the kernels table)")


def _kernel_row(shape: kernel_bench.Shape, variant: str, result: kernel_bench.Result, results: dict) -> dict:
    row = {"T": shape.length, "d": shape.head_dim, "batch": shape.batch, "variant": variant}
    if result.error:
        return row | {"error": result.error}
    row |= {"fwd_ms": result.fwd_s * 1e3, "fwd_bwd_ms": result.fwd_bwd_s * 1e3}
    row["fwd_bwd_tflops"] = kernel_bench.useful_flops(shape, True) / result.fwd_bwd_s / 1e12
    fused = results["fused"]
    if not fused.error:
        row["fused_speedup_fwd_bwd"] = result.fwd_bwd_s / fused.fwd_bwd_s
    return row


def _target(log: StageLog, name: str, value: float, platform: str) -> None:
    """Record `value` against its target; only a GPU run can meet or miss the H200 targets."""
    target = TARGETS[name]
    met = value <= target if name == "diff_overhead" else value >= target
    log.add_row("targets", {"target": name, "value": value, "goal": target, "met": met if platform == "gpu" else "n/a"})


# ----------------------------------------------------------------------------------------------- train step


def train_step(log: StageLog, quick: bool, platform: str) -> None:
    """paper_1_4b in bfloat16 at T=2048 on one device, DIFF then its standard baseline: the fastest remat
    policy that fits, layers halved only if none fits; the baseline starts from DIFF's layers and policy."""
    platform = jax.default_backend()
    device = jax.devices()[0]
    rows = {}
    policy = None
    for attention_type in ("diff", "standard"):
        config = load_config_file(REPO / "configs" / "paper_1_4b.py", attention_type)
        config.update(batch_size=2 if quick else 8, warmup_steps=0)
        config.mesh.shape = (1, 1, 1)
        if quick:
            config.model.update(emb_dim=64, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=128, vocab_size=512)
            config.seq_len = 128
        if policy:
            config.model.num_layers = rows["diff"]["layers"]
        order = (policy, *(p for p in REMAT_ORDER if p != policy)) if policy else REMAT_ORDER
        measured = _fitting_step(log, config, order, device, steps=3 if quick else 10)
        if measured is None:
            if log.seconds_left() < 0:
                log.out_of_time(f"deadline reached while fitting {attention_type}")
            else:
                log.finish(False, f"{attention_type}: no remat policy fits, even with a single layer")
            return
        rows[attention_type] = measured
        policy = policy or measured["remat_policy"]
        log.add_row("train_step", measured)
    overhead = 1 - rows["diff"]["tokens_per_s"] / rows["standard"]["tokens_per_s"]
    log.set("diff_overhead", overhead)
    _target(log, "mfu", rows["diff"]["mfu"], platform)
    _target(log, "diff_overhead", overhead, platform)
    log.finish(True)


def _fitting_step(log: StageLog, config, policies, device, steps: int) -> dict | None:
    """Time `config`'s step with the first policy (then fewer layers) that fits in memory, or None."""
    layers = config.model.num_layers
    while layers >= 1:
        for policy in policies:
            if log.seconds_left() < 0:
                return None
            config.model.update(num_layers=layers, remat_policy=policy)
            attempt = {"attention_type": config.model.attention_type, "layers": layers, "remat_policy": policy}
            try:
                seconds, losses, memory = _time_steps(config, device, steps)
            except Exception as error:
                if not _out_of_memory(error):
                    raise
                log.add_row("attempts", attempt | {"outcome": "out of memory"})
                continue
            log.add_row("attempts", attempt | {"outcome": "fits"})
            tokens = config.batch_size * config.seq_len
            flops = training_flops_per_token(model_config(config), config.seq_len) * tokens
            step_s = statistics.median(seconds)
            peak = peak_tflops(device, config.cpu_peak_tflops)
            return attempt | {
                "params": _parameter_count(config),
                "batch": f"{config.batch_size} x {config.seq_len}",
                "dtype": config.model.dtype,
                "attention_impl": config.model.attention_impl,
                "step_s": step_s,
                "tokens_per_s": tokens / step_s,
                "tflops": flops / step_s / 1e12,
                "mfu": flops / step_s / 1e12 / peak if peak else float("nan"),
                "memory_gib": memory,
                "losses_finite": bool(np.all(np.isfinite(losses))),
            }
        layers //= 2
    return None


def _time_steps(config, device, steps: int) -> tuple[list[float], list[float], float]:
    """Per-step seconds after two warm-up steps, the losses, and the compiled step's memory in GiB."""
    jax.clear_caches()
    step, compiled = compiled_step(config, [device])
    memory = compiled.memory_analysis()
    gib = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**30 if memory else float("nan")
    losses = [step() for _ in range(2)]
    seconds = []
    for _ in range(steps):
        seconds.append(timed(lambda: losses.append(step())))
    return seconds, losses, round(gib, 2)


def _out_of_memory(error: Exception) -> bool:
    return bool(re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory", str(error)))


def _parameter_count(config) -> int:
    abstract = nnx.eval_shape(lambda: DiffTransformer(model_config(config), rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# ----------------------------------------------------------------------------------------------- end to end


def end_to_end(log: StageLog, quick: bool, platform: str) -> None:
    """`train.py` on the tiny config with a checkpoint half-way; a second run resumes from that checkpoint
    alone and must reproduce the first bit for bit (losses, gradient norms, evaluations, final parameters);
    then `load_model` restores both onto the device."""
    work = log.path.parent.parent / "end_to_end"
    steps = 8 if quick else 300
    flags = [
        f"--config.total_steps={steps}",
        f"--config.checkpoint_every_steps={steps // 2}",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=0",
        f"--config.data.data_dir={work / 'data'}",
    ]
    if quick:
        flags += ["--config.model.num_layers=2", "--config.model.emb_dim=64", "--config.model.mlp_dim=128"]
        flags += ["--config.batch_size=4", "--config.seq_len=64", "--config.eval_batches=1"]
        flags += ["--config.warmup_steps=2", "--config.sample_tokens=0"]
    env = {**os.environ, **jax_platforms(platform)}
    if platform == "gpu":  # XLA:GPU sums some gradients (scatter-adds) with atomics, in no fixed order
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true".strip()
    log.set("xla_flags", env.get("XLA_FLAGS", ""))
    first, second = work / "uninterrupted", work / "resumed"
    started = time.monotonic()
    _train(first, flags, env, log)
    log.set("first_run_s", round(time.monotonic() - started, 1))
    shutil.copytree(first, second)
    for directory in (second / "checkpoints").iterdir():
        if directory.name.isdigit() and int(directory.name) > steps // 2:
            shutil.rmtree(directory)
    output = _train(second, flags, env, log)
    resumed = f"resuming at step {steps // 2} from " in output
    metrics = [_records(run / "metrics.jsonl") for run in (first, second)]
    trajectories = [[(r["step"], r["loss"], r["grad_norm"], r["param_norm"]) for r in m] for m in metrics]
    evaluations = [_records(run / "eval.jsonl") for run in (first, second)]
    rates = [r["tokens_per_s"] for r in metrics[0] if "tokens_per_s" in r]
    log.set("steps", steps)
    log.set("median_tokens_per_s", statistics.median(rates) if rates else float("nan"))
    log.set("eval_loss", {"first": evaluations[0][0]["eval_loss"], "last": evaluations[0][-1]["eval_loss"]})
    log.set("resumed_at_checkpoint", resumed)
    log.set("trajectory_bitwise_equal", trajectories[0] == trajectories[1])
    log.set("max_loss_difference", max(abs(a[1] - b[1]) for a, b in zip(*trajectories, strict=True)))

    from diffjax.evaluate.load import load_model

    models = [load_model(run) for run in (first, second)]
    params = [_flat(model.params) for model, _ in models]
    same_params = params[0].keys() == params[1].keys() and all(
        np.array_equal(params[0][k], v) for k, v in params[1].items()
    )
    model = models[1][0]
    logits = model(np.array([[1, 87, 107, 104]], np.int32))
    finite = bool(np.isfinite(logits).all())
    log.set(
        "load_model",
        {"step": model.step, "platforms": sorted({d.platform for d in logits.devices()}), "finite": finite},
    )
    log.set("final_params_bitwise_equal", same_params)
    problems = [
        name
        for name, ok in [
            ("the second run did not resume from the half-way checkpoint", resumed),
            ("the resumed losses differ from the uninterrupted run's", trajectories[0] == trajectories[1]),
            ("the evaluations differ", evaluations[0] == evaluations[1]),
            ("the final parameters differ", same_params),
            ("load_model's logits are not finite", finite),
        ]
        if not ok
    ]
    log.finish(not problems, "; ".join(problems))


def _train(workdir: Path, flags: list[str], env: dict, log: StageLog) -> str:
    """Run train.py into `workdir`; its output is returned and kept beside the stage's log."""
    command = [sys.executable, str(REPO / "train.py"), f"--config.workdir={workdir}", *flags]
    timeout = max(log.seconds_left(), 1)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    (workdir.parent / f"{workdir.name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"train.py into {workdir.name} failed: {lines[-1] if lines else result.returncode}")
    return result.stdout


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(params), sep="/").items()}


STAGE_FUNCTIONS: dict[str, Callable[[StageLog, bool, str], None]] = {
    "environment": environment,
    "correctness": correctness,
    "kernels": kernels,
    "train_step": train_step,
    "end_to_end": end_to_end,
}


def main(argv: list[str]) -> int:
    name, out, deadline, quick, platform = argv
    log = StageLog(Path(out) / "stages" / f"{name}.json", float(deadline))
    try:
        STAGE_FUNCTIONS[name](log, quick == "1", platform)
    except subprocess.TimeoutExpired as error:  # a child (train.py) still running at the deadline
        log.out_of_time(f"{Path(error.cmd[1]).name} was still running at the deadline")
    except Exception as error:  # the stage's error line goes into the report; the traceback into its log
        lines = str(error).strip().splitlines()
        log.fail(f"{type(error).__name__}: {lines[0] if lines else ''}"[:300])
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
