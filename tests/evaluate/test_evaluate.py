import dataclasses
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
from diffjax.evaluate.tasks import DEFAULT, TASKS, attention, lambdas, outliers, select
from diffjax.evaluate.tasks.base import EvalContext, EvalOptions, GenerationOptions, NeedleGrid
from diffjax.evaluate.tasks.needles import NeedleItem, check_grid, encode_document, needle_items, score_queries
from diffjax.train.step import loss_sums

PNG = b"\x89PNG\r\n\x1a\n"
GRID = NeedleGrid(lengths=(300,), depths=(0.0, 1.0), counts=((1, 1), (2, 2)), documents=2, batch_size=4)
OPTIONS = EvalOptions(
    split="validation", batches=2, needles=GRID, outlier_batches=2, generation=GenerationOptions(max_tokens=8)
)
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
    target = evaluate(diff_run, None, list(DEFAULT), OPTIONS, data_dir)
    assert target == diff_run / "eval" / "2"
    results = json.loads((target / RESULTS).read_text())
    assert results["step"] == 2 and results["model"]["attention_type"] == "diff"
    tasks = results["tasks"]
    assert set(tasks) == set(DEFAULT)
    for name in ("perplexity", "needles", "attention", "outliers", "lambda"):
        assert_png(target / tasks[name]["figure"])
    assert_png(target / tasks["attention"]["map_figure"])

    perplexity = tasks["perplexity"]
    assert perplexity["perplexity"] == pytest.approx(np.exp(perplexity["loss"]))
    assert perplexity["tokens_per_s"] > 0 and len(perplexity["cumulative_nll_by_position"]) == 32
    model, config = load_model(diff_run)  # the training loop's own loss over the same batches
    config.data.data_dir = data_dir
    sums = [loss_sums(model.params, model.graphdef, b)[1] for b in eval_batches(config, ByteTokenizer())]
    expected = sum(float(s) for s, _ in sums) / sum(float(c) for _, c in sums)
    assert perplexity["loss"] == pytest.approx(expected, rel=1e-5)

    needles = tasks["needles"]
    assert len(needles["cells"]) == 1 * 2 * 2 and set(needles["accuracy_by_counts"]) == {"N=1,R=1", "N=2,R=2"}
    assert all(cell["queries"] == 2 * cell["num_queries"] for cell in needles["cells"])
    assert 0.0 <= needles["accuracy"] <= 1.0

    shares = tasks["attention"]
    assert (
        shares["documents"] == 8 and len(shares["answer_by_layer"]) == 2 and set(shares["by_depth"]) == {"0.0", "1.0"}
    )
    assert 0 < shares["answer"] < 0.2 < shares["noise"] < 1  # an untrained model spreads its attention

    for kind in outliers.KINDS:
        ranked = tasks["outliers"][kind]
        values = [ranked[f"top-{k}"] for k in outliers.RANKS]
        assert values == sorted(values, reverse=True) and 0 < ranked["median"] < values[-1]
        assert len(tasks["outliers"][f"{kind}_by_layer"]) == 2

    lam = tasks["lambda"]
    assert lam["applies"] and np.allclose(lam["lambda_init"], 0.8 - 0.6 * np.exp(-0.3 * np.arange(2)))

    generated = tasks["generate"]
    assert [s["prompt"] for s in generated["samples"]] == [config.sample_prompt]
    assert all(s["cache_matches_recomputation"] and 1 <= s["tokens"] <= 8 for s in generated["samples"])
    assert generated["needle"]["expected"].strip().isdigit()
    printed = capsys.readouterr().out
    for line in ("perplexity  loss", "needles N=2,R=2", "lambda by layer", "attention of the answer's query"):
        assert line in printed
    assert "activation outliers over" in printed and "cache == recomputation           yes" in printed


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
        evaluate(workdir, None, ["needles", "attention", "lambda"], EvalOptions("validation", 1, grid), data_dir)
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
    assert all(0 <= float(row["answer share"]) <= 1 for row in summary["table"].values())
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
        (["--workdir=.", "--tasks=noise"], "unknown task 'noise'"),
        (["--workdir=.", "--temperature=-1"], "temperature=-1.0 must be >= 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "diffjax.evaluate", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m diffjax.evaluate: error: ") and message in lines[0]


def _needle_item(depth: float = 0.5) -> NeedleItem:
    tokenizer = ByteTokenizer()
    filler = split_sentences(corpus.python_docs("validation"))
    document = make_document(filler, 0, seed=5, context_length=600, num_needles=4, num_queries=2, depth=depth)
    return NeedleItem(600, (4, 2), depth, document, *encode_document(tokenizer, document))


def test_key_regions_mark_the_answer_where_the_needle_states_it():
    tokenizer, item = ByteTokenizer(), _needle_item()
    regions = attention.key_regions(tokenizer, item)
    assert regions.shape == (2, len(item.ids))
    haystack_end = 1 + len(" ".join(item.document.haystack))
    for row, (city, answer) in enumerate(zip(item.document.cities, item.document.answers, strict=True)):
        assert tokenizer.decode(item.ids[regions[row] == attention.ANSWER]) == answer
        needle = f"The magic number for {city} is {answer}."
        other = tokenizer.decode(item.ids[:haystack_end][regions[row, :haystack_end] == attention.OTHER])
        assert other == needle.replace(answer, "")  # BOS decodes to nothing
        assert (regions[row, haystack_end:] == attention.OTHER).all()  # the question lines
        noise = tokenizer.decode(item.ids[regions[row] == attention.NOISE])
        assert needle not in noise and len(noise) == haystack_end - 1 - len(needle)


def test_attention_shares_sum_to_one_with_the_rest_of_the_context():
    regions = np.array([[0, 2, 2, 1, 1, 2, 0, 0]])
    rows = np.random.default_rng(0).random((3, 4, 1, 8))  # any positive rows, unnormalised
    answer, noise = attention.region_shares(rows, regions)
    other = rows[..., [0, 6, 7]].sum(-1) / rows.sum(-1)
    np.testing.assert_allclose(answer + noise + other, 1.0)
    np.testing.assert_allclose(answer, rows[..., [3, 4]].sum(-1) / rows.sum(-1))
    differential = rows - 0.5 * rows[..., ::-1]  # A1 - lambda A2: negative entries, rows sum to 1 - lambda
    answer, noise = attention.region_shares(differential, regions)
    np.testing.assert_allclose(answer + noise + differential[..., [0, 6, 7]].sum(-1) / differential.sum(-1), 1.0)


def test_attention_forced_onto_the_answer_scores_one(diff_run, data_dir, tmp_path, monkeypatch):
    """The answer is found from the tokens alone (the digits the query is about to predict, earlier in the
    document), so this checks the task's regions and bookkeeping, not a copy of them."""

    def forced_rows(graphdef, params, tokens, queries):
        tokens, queries = np.asarray(tokens), np.asarray(queries)
        rows = np.zeros((2, *queries.shape[:1], 2, queries.shape[1], tokens.shape[1]), np.float32)
        for b, r in np.ndindex(queries.shape):
            digits = tokens[b, queries[b, r] + 2 : queries[b, r] + 9]  # after the answer's space
            (at,) = [t for t in range(queries[b, r]) if np.array_equal(tokens[b, t : t + 7], digits)]
            rows[:, b, :, r, at : at + 7] = 1 / 7
        return rows

    monkeypatch.setattr(attention, "query_rows", forced_rows)
    model, config = load_model(diff_run)
    context = EvalContext(model, config, ByteTokenizer(), OPTIONS, tmp_path, "forced")
    result = attention.run(context).figures
    assert result["answer"] == pytest.approx(1.0) and result["noise"] == pytest.approx(0.0, abs=1e-7)
    assert all(v["answer"] == pytest.approx(1.0) for v in result["by_depth"].values())
    with pytest.raises(UsageError, match="--attention_layer=2 --attention_head=0: this model has 2 layers"):
        attention.run(dataclasses.replace(context, options=dataclasses.replace(OPTIONS, map_layer=2)))


def test_outlier_statistics_are_exact_tops_and_a_close_median():
    rng = np.random.default_rng(0)
    values = np.exp(rng.normal(0, 2, (3, 2, 500)))  # [layers, batches, values], spanning decades
    magnitudes = outliers.Magnitudes(3)
    for batch in range(2):
        top = -np.sort(-values[:, batch], axis=1)[:, : max(outliers.RANKS)]
        counts = np.stack([np.histogram(v, outliers.EDGES)[0] for v in values[:, batch]])
        magnitudes.add(top, counts)
    everything = -np.sort(-values.ravel())
    ranked = magnitudes.ranked()
    assert [ranked[f"top-{k}"] for k in outliers.RANKS] == [everything[k - 1] for k in outliers.RANKS]
    lower_median = np.sort(values.ravel())[(values.size - 1) // 2]
    assert ranked["median"] == pytest.approx(lower_median, rel=0.006)
    assert magnitudes.ranked(1)["top-1"] == values[1].max()
    assert magnitudes.ranked(1)["median"] == pytest.approx(np.sort(values[1].ravel())[499], rel=0.006)


def test_outliers_measure_the_models_own_activations(diff_run, data_dir):
    model, config = load_model(diff_run)
    config.data.data_dir = data_dir
    batch = eval_batches(config, ByteTokenizer(), count=1)[0]
    stats = outliers.layer_magnitudes(model.graphdef, model.params, batch)
    module = model.module
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    hidden, logits, mask = module.probe(args[0], lambda x, maps: (x, maps.logits, maps.mask), *args[1:])
    real = np.asarray(batch["segment_ids"]) != 0
    for layer in range(2):
        seen = np.broadcast_to(np.asarray(mask[layer]), logits.shape[1:])
        expected_logits = np.sort(np.abs(np.asarray(logits[layer]))[seen])[::-1]
        expected_hidden = np.sort(np.abs(np.asarray(hidden[layer]))[real].ravel())[::-1]
        for kind, expected in (("attention_logits", expected_logits), ("hidden_states", expected_hidden)):
            top, counts = (np.asarray(x[layer]) for x in stats[kind])
            np.testing.assert_allclose(top, expected[:100], rtol=1e-6)
            assert counts.sum() == expected.size


def test_shares_outside_zero_and_one_are_explained_where_they_are_printed(diff_run, tmp_path, monkeypatch):
    """DIFF's rows are divided by 1 - lambda; where lambda A2 outweighs A1 a share leaves [0, 1]."""
    monkeypatch.setattr(attention, "_shares", lambda context, items: (np.full((8, 2), -0.05), np.full((8, 2), 1.076)))
    model, config = load_model(diff_run)
    result = attention.run(EvalContext(model, config, ByteTokenizer(), OPTIONS, tmp_path, "run"))
    assert result.summary["noise share"] == "1.076 (above 1: see the note below)"
    assert result.summary["answer share"] == "-0.050 (below 0: see the note below)"
    assert result.tables[0].endswith(attention.SHARE_NOTE)


def test_the_map_figure_keeps_a1_visible_and_its_colour_bar_beside_the_maps(diff_run, tmp_path):
    model, config = load_model(diff_run)
    context = EvalContext(model, config, ByteTokenizer(), OPTIONS, tmp_path, "run")
    figure = attention.map_figure(context, needle_items(GRID, ByteTokenizer(), 2), 1, 0)
    figure.canvas.draw()
    *maps, row = figure.axes
    lines = {line.get_label(): line for line in row.get_lines()}
    a1, effective = lines["A1"], lines["A1 - lambda A2 (effective)"]
    assert a1.get_linewidth() > 2 * effective.get_linewidth() and a1.get_zorder() < effective.get_zorder()
    assert effective.get_linestyle() == "--"
    colour_bar = maps[-1].child_axes[0].get_position()
    assert 0 <= colour_bar.x0 - maps[-1].get_position().x1 < 0.03  # figure widths


def test_a_model_that_retrieves_nothing_is_told_in_words(diff_run, tmp_path, monkeypatch):
    from diffjax.evaluate.tasks import needles

    monkeypatch.setattr(needles, "_score", lambda context, items: [[False] * item.counts[1] for item in items])
    model, config = load_model(diff_run)
    result = needles.run(EvalContext(model, config, ByteTokenizer(), OPTIONS, tmp_path, "run"))
    assert result.summary["accuracy (all)"] == f"0.000 (12 queries): {needles.NOTHING_RETRIEVED}"  # 4 x 1 + 4 x 2
    assert_png(tmp_path / result.figures["figure"])
