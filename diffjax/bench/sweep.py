"""The small-scale reproduction as a sweep that separates the method from seed noise.

DIFF with the per-head gain (diffjax's default), DIFF without it (the Hugging Face layout) and the standard
baseline each train at several learning rates and seeds; every run is an ordinary run directory under
`<out>/runs/`. A run whose final validation loss is recorded is skipped and an interrupted one resumes from
its checkpoint, so running the same command again finishes a sweep. Then, in `<out>`:

- `results.json`, `results.md`: the final validation loss per variant and learning rate as mean and sample
  standard deviation over the seeds, the best learning rate per variant, and the gaps between variants at
  their best rates with their standard errors: a gap counts as larger than seed noise when it exceeds
  twice its standard error;
- `loss_vs_lr.png`: loss against learning rate with one-standard-deviation error bars;
- with `evaluate`, `python -m diffjax.evaluate` on the first seed's run at each variant's best rate, and
  `compare` of those runs in `<out>/compare/`.
"""

import json
import math
import subprocess
import sys
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from etils import epath

from diffjax import files
from diffjax.cli import RunFailure, UsageError
from diffjax.config import validate
from diffjax.evaluate.plots import new_figure, save
from diffjax.train.loop import run
from diffjax.train.metrics import read_curve

VARIANTS = {
    "diff": dict(attention_type="diff", subln_affine=True),
    "diff_nogain": dict(attention_type="diff", subln_affine=False),
    "standard": dict(attention_type="standard"),
}
NOISE_FACTOR = 2.0  # a gap beyond this many standard errors is called larger than seed noise


def run_name(variant: str, learning_rate: float, seed: int) -> str:
    return f"{variant}_lr{learning_rate:g}_seed{seed}"


def run_config(
    base: ml_collections.ConfigDict, variant: str, learning_rate: float, seed: int, out: epath.Path
) -> ml_collections.ConfigDict:
    """`base` as `variant` at `learning_rate` (the schedule's end scaled with it) and `seed`, in `out/runs/`."""
    if variant not in VARIANTS:
        raise UsageError(f"variant {variant!r} is unknown; choose from {list(VARIANTS)}")
    config = ml_collections.ConfigDict(base.to_dict())
    config.model.update(VARIANTS[variant])
    config.learning_rate = learning_rate
    config.end_learning_rate = learning_rate * base.end_learning_rate / base.learning_rate
    config.seed = seed
    config.sample_tokens = 0
    config.workdir = str(out / "runs" / run_name(variant, learning_rate, seed))
    # The seed changes no compiled program: a run's seeds after the first read theirs from this cache.
    config.compilation_cache_dir = base.compilation_cache_dir or str(out / "xla_cache")
    validate(config)
    return config


def final_loss(config: ml_collections.ConfigDict) -> float | None:
    """The validation loss at `total_steps`, or None while the run is unfinished."""
    steps, losses = read_curve(files.path(config.workdir) / "eval.jsonl", "eval_loss")
    return losses[-1] if steps and steps[-1] == config.total_steps else None


def train_all(configs: Sequence[ml_collections.ConfigDict], log: Callable[[str], None]) -> None:
    """Train every unfinished run in turn."""
    for index, config in enumerate(configs, start=1):
        name = files.path(config.workdir).name
        if final_loss(config) is not None:
            log(f"[{index}/{len(configs)}] {name}: finished before, skipped")
            continue
        log(f"[{index}/{len(configs)}] {name}: training")
        if "last_eval_loss" not in run(config):
            raise RunFailure(f"{name} stopped before step {config.total_steps}; run the same command again to resume")


def summarize(losses: dict[str, dict[float, list[float]]]) -> dict[str, dict]:
    """Mean and standard deviation per variant and rate, the best rate per variant, and the gaps that matter:
    each DIFF variant against the baseline, and DIFF with the gain against DIFF without it."""
    variants = {}
    for variant, by_rate in losses.items():
        rates = {lr: {"mean": float(np.mean(v)), "std": _std(v), "losses": list(v)} for lr, v in by_rate.items()}
        best = min(rates, key=lambda lr: rates[lr]["mean"])
        variants[variant] = {"learning_rates": rates, "best_learning_rate": best}
    pairs = [(v, "standard") for v in variants if v != "standard" and "standard" in variants]
    if "diff" in variants and "diff_nogain" in variants:
        pairs.append(("diff", "diff_nogain"))
    return {"variants": variants, "gaps": {f"{a} - {b}": _gap(variants[a], variants[b]) for a, b in pairs}}


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _gap(a: dict, b: dict) -> dict[str, float | bool]:
    """`a`'s best mean minus `b`'s, its standard error (Welch) and whether it exceeds NOISE_FACTOR of them."""
    best_a = a["learning_rates"][a["best_learning_rate"]]
    best_b = b["learning_rates"][b["best_learning_rate"]]
    gap = best_a["mean"] - best_b["mean"]
    error = math.sqrt(best_a["std"] ** 2 / len(best_a["losses"]) + best_b["std"] ** 2 / len(best_b["losses"]))
    return {"gap": gap, "standard_error": error, "beyond_noise": bool(abs(gap) > NOISE_FACTOR * error)}


def markdown(summary: dict, seeds: int) -> str:
    """The results as a table of mean ± standard deviation (best rate in bold) and one line per gap."""
    variants = summary["variants"]
    rates = sorted({lr for v in variants.values() for lr in v["learning_rates"]})
    rows = []
    for name, variant in variants.items():
        row = [name]
        for lr in rates:
            cell = variant["learning_rates"].get(lr)
            text = f"{cell['mean']:.4f} ± {cell['std']:.4f}" if cell else "-"
            row.append(f"**{text}**" if lr == variant["best_learning_rate"] else text)
        rows.append(row)
    header = ["variant", *(f"lr {lr:g}" for lr in rates)]
    lines = [f"Final validation loss, mean ± standard deviation over {seeds} seeds (best rate in bold):", ""]
    lines += ["| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows]]
    lines.append("")
    for name, gap in summary["gaps"].items():
        verdict = "larger than" if gap["beyond_noise"] else "within"
        lines.append(
            f"- {name} at their best rates: {gap['gap']:+.4f} ± {gap['standard_error']:.4f} (standard error), "
            f"{verdict} seed noise ({NOISE_FACTOR:g} standard errors)"
        )
    return "\n".join(lines)


def plot(summary: dict, path: epath.Path) -> str:
    figure = new_figure()
    axes = figure.add_subplot()
    for name, variant in summary["variants"].items():
        rates = sorted(variant["learning_rates"])
        means = [variant["learning_rates"][lr]["mean"] for lr in rates]
        stds = [variant["learning_rates"][lr]["std"] for lr in rates]
        axes.errorbar(rates, means, yerr=stds, marker="o", capsize=4, label=name)
    axes.set_xscale("log")
    axes.set_xlabel("peak learning rate")
    axes.set_ylabel("final validation loss (mean ± 1 sd over seeds)")
    axes.legend()
    return save(figure, path)


def evaluate_best(summary: dict, configs: dict[tuple[str, float, int], ml_collections.ConfigDict], seed: int, out):
    """`python -m diffjax.evaluate` on each variant's best-rate run of `seed` (unless done), then `compare`."""
    runs = []
    for name, variant in summary["variants"].items():
        config = configs[(name, variant["best_learning_rate"], seed)]
        workdir = files.path(config.workdir)
        if not (workdir / "eval" / str(config.total_steps) / "results.json").is_file():
            _module("diffjax.evaluate", f"--workdir={workdir}")
        runs.append(str(workdir))
    _module("diffjax.evaluate", "compare", f"--runs={','.join(runs)}", f"--out={out / 'compare'}")


def _module(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", *args])
    if result.returncode:
        raise RunFailure(f"python -m {' '.join(args)} failed (exit code {result.returncode})")


def sweep(
    base: ml_collections.ConfigDict,
    variants: Sequence[str],
    learning_rates: Sequence[float],
    seeds: Sequence[int],
    out: files.PathLike,
    *,
    evaluate: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train (or finish) every run, write the summary files into `out`, and return the summary."""
    out = files.path(out)
    if files.is_remote(out):
        raise UsageError(f"--out={out} must be a local directory (the figure is drawn there)")
    configs = {
        (v, lr, s): run_config(base, v, lr, s, out) for v in variants for lr in learning_rates for s in seeds
    }  # every config is checked before anything trains
    out.mkdir(parents=True, exist_ok=True)
    train_all(list(configs.values()), log)
    losses = {v: {lr: [final_loss(configs[(v, lr, s)]) for s in seeds] for lr in learning_rates} for v in variants}
    summary = summarize(losses)
    summary["plot"] = plot(summary, out / "loss_vs_lr.png")
    files.write_atomically(out / "results.md", markdown(summary, len(seeds)) + "\n")
    files.write_atomically(out / "results.json", _json(summary))
    if evaluate:
        evaluate_best(summary, configs, seeds[0], out)
    return summary


def _json(summary: dict) -> str:
    """`summary` as JSON, learning-rate keys written as `{lr:g}`."""

    def text_keys(value):
        if isinstance(value, dict):
            return {f"{k:g}" if isinstance(k, float) else k: text_keys(v) for k, v in value.items()}
        return value

    return json.dumps(text_keys(summary), indent=2)
