"""The small-scale reproduction as a sweep that separates the method from seed noise.

DIFF with the per-head gain (diffjax's default), DIFF without it (the Hugging Face layout) and the standard
baseline each train at several learning rates and seeds; every run is an ordinary run directory under
`<out>/runs/`. A run whose final validation loss is recorded is skipped and an interrupted one resumes from
its checkpoint, so running the same command again finishes a sweep. Then, in `<out>`:

- `results.json`, `results.md`: the final validation loss per variant and learning rate as mean and sample
  standard deviation over the seeds, the best learning rate per variant (flagged when it is the grid's
  smallest or largest, as the optimum may then lie beyond it), and the gaps between variants at their best
  rates with their standard errors: a gap counts as larger than seed noise when Welch's t-test over the
  seeds gives p < 0.05;
- `loss_vs_lr.png`: loss against learning rate with one-standard-deviation error bars;
- with `evaluate`, `python -m diffjax.evaluate` on every seed's run at each variant's best rate, the
  attention-noise, retrieval and outlier figures as mean and standard deviation over the seeds with the same
  gaps and tests (in the results files), and `compare` of the first seed's runs in `<out>/compare/`.
"""

import json
import math
import subprocess
import sys
from collections.abc import Callable, Collection, Sequence

import ml_collections
import numpy as np
from etils import epath
from scipy import stats

from diffjax import files
from diffjax.cli import RunFailure, UsageError
from diffjax.config import validate
from diffjax.evaluate.plots import new_figure, save
from diffjax.evaluate.results import RESULTS, eval_directory, read_json
from diffjax.train.loop import run
from diffjax.train.metrics import read_curve

VARIANTS = {
    "diff": dict(attention_type="diff", subln_affine=True),
    "diff_nogain": dict(attention_type="diff", subln_affine=False),
    "standard": dict(attention_type="standard"),
}
SIGNIFICANCE = 0.05  # a gap whose Welch t-test p-value is below this is called larger than seed noise
EVALUATION_METRICS = {  # name: (task, keys down to the figure in that task's results)
    "needle accuracy": ("needles", "accuracy"),
    "answer share": ("attention", "answer"),
    "noise share": ("attention", "noise"),
    "attention logit top-1": ("outliers", "attention_logits", "top-1"),
    "hidden state top-1": ("outliers", "hidden_states", "top-1"),
    "hidden state median": ("outliers", "hidden_states", "median"),
}


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
    """Mean and standard deviation per variant and rate, the best rate per variant, and the `difference` of each
    of `pairs` at their best rates."""
    variants = {}
    for variant, by_rate in losses.items():
        rates = {lr: _spread(v) for lr, v in by_rate.items()}
        best = min(rates, key=lambda lr: rates[lr]["mean"])
        # At either end of the grid the optimum may lie beyond the best rate measured.
        at_edge = len(rates) > 1 and best in (min(rates), max(rates))
        variants[variant] = {"learning_rates": rates, "best_learning_rate": best, "best_at_edge": at_edge}
    best = {
        name: variant["learning_rates"][variant["best_learning_rate"]]["values"] for name, variant in variants.items()
    }
    return {"variants": variants, "gaps": {f"{a} - {b}": difference(best[a], best[b]) for a, b in pairs(variants)}}


def pairs(variants: Collection[str]) -> list[tuple[str, str]]:
    """The comparisons that matter: each DIFF variant against the baseline, and DIFF with the gain against DIFF
    without it."""
    compared = [(v, "standard") for v in variants if v != "standard" and "standard" in variants]
    if "diff" in variants and "diff_nogain" in variants:
        compared.append(("diff", "diff_nogain"))
    return compared


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float | bool]:
    """mean(a) - mean(b), its standard error and the p-value of Welch's t-test (NaN without a spread to test
    against); beyond noise when p < SIGNIFICANCE."""
    gap = float(np.mean(a) - np.mean(b))
    error = math.sqrt(_std(a) ** 2 / len(a) + _std(b) ** 2 / len(b))
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue) if error > 0 else float("nan")
    return {"gap": gap, "standard_error": error, "p_value": p, "beyond_noise": bool(p < SIGNIFICANCE)}


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
    for name, variant in variants.items():
        if variant["best_at_edge"]:
            lines.append(
                f"- {name}'s best rate {variant['best_learning_rate']:g} is at the edge of the grid: "
                "its optimum may lie beyond, so add a rate past it to --sweep_learning_rates"
            )
    for name, gap in summary["gaps"].items():
        verdict = f"larger than seed noise (p < {SIGNIFICANCE:g})" if gap["beyond_noise"] else "within seed noise"
        lines.append(
            f"- {name} at their best rates: {gap['gap']:+.4f} ± {gap['standard_error']:.4f} (standard error), "
            f"Welch's t-test p = {gap['p_value']:.2g}: {verdict}"
        )
    if summary.get("evaluation"):
        lines += ["", *_evaluation_table(summary["evaluation"], summary["evaluation_gaps"], seeds)]
    return "\n".join(lines)


def _evaluation_table(
    evaluation: dict[str, dict[str, dict]], gaps: dict[str, dict[str, dict]], seeds: int
) -> list[str]:
    """Mean ± standard deviation per variant, then each gap with its p-value (in bold below SIGNIFICANCE)."""
    names = list(evaluation)
    metrics = [m for m in EVALUATION_METRICS if any(m in evaluation[n] for n in names)]
    lines = [
        f"`python -m diffjax.evaluate` at each variant's best rate: mean ± standard deviation over {seeds} seeds, "
        f"and the gaps with Welch's t-test p-values (bold: p < {SIGNIFICANCE:g})",
        "",
        "| | " + " | ".join([*names, *gaps]) + " |",
        "| --- " * (len(names) + len(gaps) + 1) + "|",
    ]
    for metric in metrics:
        cells = [_spread_cell(evaluation[n].get(metric)) for n in names]
        cells += [_gap_cell(by_metric.get(metric)) for by_metric in gaps.values()]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines


def _spread_cell(spread: dict | None) -> str:
    return f"{spread['mean']:.3f} ± {spread['std']:.3f}" if spread else "-"


def _gap_cell(gap: dict | None) -> str:
    if not gap:
        return "-"
    text = f"{gap['gap']:+.3f} (p = {gap['p_value']:.2g})"
    return f"**{text}**" if gap["beyond_noise"] else text


def evaluation_gaps(evaluation: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """`difference` of every evaluation figure that both sides of each of `pairs` have."""
    return {
        f"{a} - {b}": {
            metric: difference(spread["values"], evaluation[b][metric]["values"])
            for metric, spread in evaluation[a].items()
            if metric in evaluation[b]
        }
        for a, b in pairs(evaluation)
    }


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


def evaluate_best(
    summary: dict, configs: dict[tuple[str, float, int], ml_collections.ConfigDict], seeds: Sequence[int], out
) -> dict[str, dict[str, dict]]:
    """`python -m diffjax.evaluate` on every seed's run at each variant's best rate (unless done before; needle
    documents of `needle_bytes`), `compare` of the first seed's runs, and each figure of EVALUATION_METRICS as
    mean and standard deviation over the seeds, per variant."""
    statistics, compared = {}, []
    for name, variant in summary["variants"].items():
        runs = [configs[(name, variant["best_learning_rate"], seed)] for seed in seeds]
        evaluations = [_evaluation(config) for config in runs]
        statistics[name] = {
            metric: _spread([_lookup(tasks, path) for tasks in evaluations])
            for metric, path in EVALUATION_METRICS.items()
            if all(path[0] in tasks for tasks in evaluations)
        }
        compared.append(runs[0].workdir)
    _module("diffjax.evaluate", "compare", f"--runs={','.join(compared)}", f"--out={out / 'compare'}")
    return statistics


def _evaluation(config: ml_collections.ConfigDict) -> dict:
    """The tasks' results of the run's last step, evaluated first unless that was done before."""
    workdir = files.path(config.workdir)
    path = eval_directory(workdir, config.total_steps) / RESULTS
    if not path.is_file():
        _module("diffjax.evaluate", f"--workdir={workdir}", f"--needle_lengths={needle_bytes(config)}")
    return read_json(path)["tasks"]


def needle_bytes(config: ml_collections.ConfigDict) -> int:
    """One needle-document length: a training sequence, or the default grid's shortest (512 bytes, room for six
    needles and two questions) if that is longer. The default grid's 1-2K bytes would be 8-16 times the tiny
    model's training length and cost more than half of each evaluation."""
    return max(512, config.seq_len)


def _lookup(tasks: dict, path: tuple[str, ...]) -> float:
    for key in path:
        tasks = tasks[key]
    return float(tasks)


def _spread(values: Sequence[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": _std(values), "values": list(values)}


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
    _write(summary, len(seeds), out)  # the losses stand even if an evaluation fails
    if evaluate:
        summary["evaluation"] = evaluate_best(summary, configs, seeds, out)
        summary["evaluation_gaps"] = evaluation_gaps(summary["evaluation"])
        _write(summary, len(seeds), out)
    return summary


def _write(summary: dict, seeds: int, out: epath.Path) -> None:
    files.write_atomically(out / "results.md", markdown(summary, seeds) + "\n")
    files.write_atomically(out / "results.json", _json(summary))


def _json(summary: dict) -> str:
    """`summary` as JSON, learning-rate keys written as `{lr:g}`."""

    def text_keys(value):
        if isinstance(value, dict):
            return {f"{k:g}" if isinstance(k, float) else k: text_keys(v) for k, v in value.items()}
        return value

    return json.dumps(text_keys(summary), indent=2)
