import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO, save_run

from diffjax.cli import UsageError
from diffjax.config import ConfigError
from diffjax.data import corpus
from diffjax.data.needles import make_document, split_sentences
from diffjax.data.pipeline import eval_batches
from diffjax.data.tokenizer import ByteTokenizer
from diffjax.evaluate import compare as compare_module
from diffjax.evaluate.load import load_model
from diffjax.evaluate.results import RESULTS
from diffjax.evaluate.runner import evaluate
from diffjax.evaluate.tasks import TASKS, lambdas, select
from diffjax.evaluate.tasks.base import EvalContext, EvalOptions, NeedleGrid
from diffjax.evaluate.tasks.needles import check_grid, encode_document, score_queries
from diffjax.train.step import loss_sums

PNG = b"\x89PNG\r\n\x1a\n"
GRID = NeedleGrid(lengths=(300, 400), depths=(0.0, 1.0), counts=((1, 1), (2, 2)), documents=2, batch_size=4)
OPTIONS = EvalOptions(split="validation", batches=2, needles=GRID)
SETTINGS = dict(seq_len=32, batch_size=4, eval_batches=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def diff_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_diff")
    save_run(workdir, [2], **SETTINGS)
    return workdir


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_standard")
    save_run(workdir, [1], model={"attention_type": "standard"}, **SETTINGS)
    return workdir


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG


def test_every_task_writes_results_and_figures(diff_run, data_dir, capsys):
    target = evaluate(diff_run, None, ["perplexity", "needles", "lambda"], OPTIONS, data_dir)
    assert target == diff_run / "eval" / "2"
    results = json.loads((target / RESULTS).read_text())
    assert results["step"] == 2 and results["model"]["attention_type"] == "diff"
    tasks = results["tasks"]
    for name in ("perplexity", "needles", "lambda"):
        assert_png(target / tasks[name]["figure"])

    perplexity = tasks["perplexity"]
    assert perplexity["perplexity"] == pytest.approx(np.exp(perplexity["loss"]))
    assert perplexity["tokens_per_s"] > 0 and len(perplexity["cumulative_nll_by_position"]) == 32
    model, config = load_model(diff_run)  # the training loop's own loss over the same batches
    config.data.data_dir = data_dir
    sums = [loss_sums(model.params, model.graphdef, b)[1] for b in eval_batches(config, ByteTokenizer())]
    expected = sum(float(s) for s, _ in sums) / sum(float(c) for _, c in sums)
    assert perplexity["loss"] == pytest.approx(expected, rel=1e-5)

    needles = tasks["needles"]
    assert len(needles["cells"]) == 2 * 2 * 2 and set(needles["accuracy_by_counts"]) == {"N=1,R=1", "N=2,R=2"}
    assert all(cell["queries"] == 2 * cell["num_queries"] for cell in needles["cells"])
    assert 0.0 <= needles["accuracy"] <= 1.0

    lam = tasks["lambda"]
    assert lam["applies"] and np.allclose(lam["lambda_init"], 0.8 - 0.6 * np.exp(-0.3 * np.arange(2)))
    printed = capsys.readouterr().out
    assert "perplexity  loss" in printed and "needles N=2,R=2" in printed and "lambda by layer" in printed


def test_lambda_is_the_models_own(diff_run):
    from diffjax.evaluate.tasks.lambdas import learned_lambdas

    model, _ = load_model(diff_run)
    attn = jax.tree.map(np.asarray, model.params["blocks"]["attn"])
    q1, k1, q2, k2 = (attn[name][...] for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"))
    expected = np.exp((q1 * k1).sum(-1)) - np.exp((q2 * k2).sum(-1)) + 0.8 - 0.6 * np.exp(-0.3 * np.arange(2))
    context = type("Context", (), {"model": model})()
    np.testing.assert_allclose(learned_lambdas(context), expected, rtol=1e-5)


def test_a_rerun_keeps_other_tasks_and_a_failing_task_writes_nothing(diff_run, data_dir, monkeypatch):
    target = evaluate(diff_run, 2, ["lambda"], OPTIONS, data_dir)
    before = (target / RESULTS).read_text()
    assert {"lambda"} <= set(json.loads(before)["tasks"])

    def broken(context):
        (context.out / "partial.png").write_bytes(b"half")
        raise RuntimeError("task failed")

    monkeypatch.setitem(TASKS, "lambda", broken)
    with pytest.raises(RuntimeError):
        evaluate(diff_run, 2, ["lambda"], OPTIONS, data_dir)
    assert (target / RESULTS).read_text() == before and not (target / "partial.png").exists()
    assert not [p.name for p in (diff_run / "eval").iterdir() if p.name.startswith(".")]  # no scratch left


def test_lambda_does_not_apply_to_v2_or_the_baseline(tmp_path):
    for attention_type in ("diff_v2", "standard"):
        config = ml_collections.ConfigDict({"model": {"attention_type": attention_type}})
        context = EvalContext(None, config, ByteTokenizer(), OPTIONS, tmp_path, "run")  # the model is never read
        result = lambdas.run(context)
        assert result.figures["applies"] is False and "lambda" in result.figures["reason"]
        assert result.summary["applies"].startswith("no: ") and not list(tmp_path.iterdir())


def test_the_needle_scorer_scores_a_perfect_predictor_1_and_a_wrong_one_0():
    tokenizer = ByteTokenizer()
    filler = split_sentences(corpus.python_docs("validation"))
    document = make_document(filler, 0, seed=5, context_length=600, num_needles=4, num_queries=2, depth=0.5)
    ids, spans = encode_document(tokenizer, document)
    assert tokenizer.decode(ids) == document.text and len(spans) == 2
    for span, answer in zip(spans, document.answers, strict=True):
        assert tokenizer.decode(span.tokens) == " " + answer
        assert tokenizer.decode(ids[: span.start]) == document.prompt_for(spans.index(span))

    perfect = np.append(ids[1:], 0)  # predicted[t] is the token at t + 1
    assert score_queries(perfect, spans) == [True, True]
    wrong = perfect.copy()
    for span in spans:
        wrong[span.start + 2] += 1  # one wrong digit per answer
    assert score_queries(wrong, spans) == [False, False]
    one_right = perfect.copy()
    one_right[spans[1].start - 1] += 1
    assert score_queries(one_right, spans) == [True, False]
    assert score_queries(perfect[: spans[1].start], spans) == [True, False]  # a cut-off answer is wrong


def test_bad_grids_and_tasks_are_usage_errors(diff_run, data_dir):
    with pytest.raises(UsageError, match="cannot hold 6 needles and 2 questions; use at least 460"):
        check_grid(NeedleGrid((300,), (0.5,), ((6, 2),), 1, 1))
    with pytest.raises(UsageError, match="depths are fractions"):
        check_grid(NeedleGrid((300,), (1.5,), ((1, 1),), 1, 1))
    with pytest.raises(UsageError, match="'attention' is not available yet"):
        select(["perplexity", "attention"])
    with pytest.raises(UsageError, match="unknown task 'perplexiti'"):
        select(["perplexiti"])
    with pytest.raises(ConfigError, match=r"no checkpoint of step 7 .* holds steps \[2\]"):
        evaluate(diff_run, 7, ["lambda"], OPTIONS, data_dir)


def test_compare_puts_two_runs_side_by_side(diff_run, standard_run, tmp_path, data_dir, capsys):
    runs = [standard_run, diff_run]
    grid = NeedleGrid((160,), (0.5,), ((1, 1),), 1, 1)
    for workdir in runs:
        (workdir / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": {5 - s}}}\n' for s in range(1, 4)))
        (workdir / "eval.jsonl").write_text('{"step": 0, "eval_loss": 5.5}\n{"step": 3, "eval_loss": 2.5}\n')
        evaluate(workdir, None, ["needles", "lambda"], EvalOptions("validation", 1, grid), data_dir)
    capsys.readouterr()
    out = compare_module.compare(runs)
    assert out == standard_run / "eval" / "compare"
    summary = json.loads((out / "compare.json").read_text())
    names = [standard_run.name, diff_run.name]
    assert list(summary["table"]) == names and summary["table"][names[0]]["attention"] == "standard"
    assert (
        summary["table"][names[1]]["needles N=1,R=1"] in ("0.00", "1.00")
        and "mean lambda" in summary["table"][names[1]]
    )
    assert_png(out / compare_module.CURVES)
    assert_png(out / compare_module.BARS)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["run", "attention", "params"] and printed[1].startswith(names[0])
    with pytest.raises(UsageError, match="has no evaluation results"):
        compare_module.compare([diff_run, tmp_path])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workdir=/nonexistent/run"], "workdir /nonexistent/run does not exist"),
        (["--workdir=.", "--tasks=outliers"], "task 'outliers' is not available yet"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "diffjax.evaluate", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m diffjax.evaluate: error: ") and message in lines[0]
