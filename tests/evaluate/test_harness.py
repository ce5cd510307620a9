"""lm-evaluation-harness on diffjax checkpoints: DiffjaxLM against direct scoring, and against the harness's own
`hf` model on the exported checkpoint (local task YAMLs: nothing is downloaded)."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, load_config, save_run

from diffjax.cli import UsageError
from diffjax.data.tokenizer import ByteTokenizer
from diffjax.evaluate.generate import encode_prompt, generate, until_stop
from diffjax.evaluate.load import load_model
from diffjax.evaluate.local_tasks import TASKS, write_tasks

lm_eval = pytest.importorskip("lm_eval")

from diffjax.evaluate.harness import DiffjaxLM  # noqa: E402  (needs lm_eval)

CHOICE, ROLLING, NEXT_WORD = TASKS


class Request:
    """What the harness hands an LM: `args`."""

    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("random")
    save_run(workdir, [1], seq_len=32)
    return load_model(workdir)


def direct_logprobs(model, tokens: list[int]) -> np.ndarray:
    """log p(token t | tokens before it) for t >= 1, from the model's logits of the whole sequence."""
    logprobs = np.asarray(jax.nn.log_softmax(model(np.asarray([tokens[:-1]]))[0]))
    return logprobs[np.arange(len(tokens) - 1), tokens[1:]]


def test_scores_are_the_models_log_probabilities_in_any_batch_and_order(random_model):
    model, config = random_model
    lm = DiffjaxLM(model, ByteTokenizer(), config.seq_len, batch_size=2)
    rng = np.random.default_rng(0)
    lengths = [(3, 2), (20, 5), (1, 1), (9, 4), (30, 2)]
    pairs = [(list(rng.integers(3, 259, n)), list(rng.integers(3, 259, m))) for n, m in lengths]
    scores = lm.score(pairs, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, scores, strict=True):
        expected = direct_logprobs(model, context + continuation)[-len(continuation) :]
        assert logprob == pytest.approx(expected.sum(), abs=1e-4)
        assert isinstance(greedy, bool)
    assert lm.requests == 0  # score is the core; requests are counted by the harness entry points


def test_a_sequence_longer_than_the_model_keeps_its_last_tokens_and_says_so(random_model):
    model, config = random_model
    said = []
    lm = DiffjaxLM(model, ByteTokenizer(), config.seq_len, log=said.append)
    context, continuation = list(range(3, 3 + 50)), [7, 8, 9]
    [(logprob, _)] = lm.score([(context, continuation)], disable_tqdm=True)
    kept = (context + continuation)[-(config.seq_len + 1) :]
    assert logprob == pytest.approx(direct_logprobs(model, kept)[-3:].sum(), abs=1e-4)
    assert len(said) == 1 and "1 of 1 requests scored were longer than the model's 32 tokens" in said[0]
    with pytest.raises(UsageError, match="continues with 40 tokens; the model scores 1 to 32"):
        lm.score([([1], list(range(3, 43)))])


def test_rolling_loglikelihood_is_the_whole_texts_after_bos(random_model):
    model, config = random_model
    lm = DiffjaxLM(model, ByteTokenizer(), config.seq_len)
    short, long = "def f(x): return x", "a longer text that needs three windows of 32 bytes " * 2
    [short_total, long_total] = lm.loglikelihood_rolling([Request(short), Request(long)], disable_tqdm=True)
    ids = ByteTokenizer().encode(short).tolist()
    assert short_total == pytest.approx(direct_logprobs(model, [1, *ids]).sum(), abs=1e-4)
    windows = lm.score([([1], ByteTokenizer().encode(long).tolist()[:32])], disable_tqdm=True)
    assert long_total < windows[0][0]  # more windows, more (negative) log-probability
    assert lm.requests == 2


def test_generation_in_batches_of_mixed_lengths_is_each_prompts_own_greedy_text(random_model):
    model, config = random_model
    tokenizer = ByteTokenizer()
    lm = DiffjaxLM(model, tokenizer, config.seq_len, batch_size=4)
    prompts = ["The ", "class A:", "The ", "x = 1", "def g"]
    settings = {"until": ["\n", "e"], "max_gen_toks": 12, "do_sample": False}
    texts = lm.generate_until([Request(prompt, dict(settings)) for prompt in prompts], disable_tqdm=True)
    for prompt, text in zip(prompts, texts, strict=True):
        tokens = until_stop(generate(model.graphdef, model.params, encode_prompt(tokenizer, prompt), 12).tokens, None)
        expected = tokenizer.decode(tokens)
        for stop in settings["until"]:
            expected = expected.split(stop)[0]
        assert text == expected
    with pytest.raises(UsageError, match="asks for 40 generated tokens; the model's length is 32"):
        lm.generate_until([Request("x", {"until": [], "max_gen_toks": 40})])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 150 steps on the embedded corpus, its HF export and the local harness tasks."""
    from diffjax.convert.runs import export_run
    from diffjax.train.loop import run

    root = tmp_path_factory.mktemp("harness")
    config = load_config(REPO / "configs" / "tiny.py")
    config.model.update(dict(emb_dim=64, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=128))
    config.update(dict(workdir=str(root / "run"), total_steps=150, checkpoint_every_steps=150, eval_every_steps=150))
    run(config)
    return root / "run", export_run(root / "run", root / "hf", "hf"), root / "tasks", write_tasks(root / "tasks", 24)


def evaluate_with(lm, tasks, include_path):
    from diffjax.evaluate.harness import task_manager

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(str(include_path)))


@pytest.mark.slow
@pytest.mark.xdist_group("harness_trained")  # one worker builds the module's `trained`
def test_every_request_scores_as_the_harness_hf_model_scores_the_export(trained):
    """The peer: lm-eval's own `hf` model on the exported directory, request by request, in float32.

    The export's tokenizer starts encodings with BOS as diffjax does, so contexts match. For rolling
    log-likelihoods the hf model then also scores that BOS after its BOS prefix, so it runs with
    add_bos_token=False there: it then scores the text after BOS, as diffjax does.
    """
    from lm_eval.models.huggingface import HFLM

    workdir, hf, include_path, _ = trained
    model, config = load_model(workdir)
    ours = DiffjaxLM(model, ByteTokenizer(), config.seq_len)
    theirs = HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=16)
    theirs_rolling = HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=16, add_bos_token=False)
    for tasks, peer in [([CHOICE, NEXT_WORD], theirs), ([ROLLING], theirs_rolling)]:
        a, b = evaluate_with(ours, tasks, include_path), evaluate_with(peer, tasks, include_path)
        for task in tasks:
            for mine, peers in zip(a["samples"][task], b["samples"][task], strict=True):
                for x, y in zip(mine["resps"], peers["resps"], strict=True):
                    if task == NEXT_WORD:
                        assert x == y
                    elif task == CHOICE:
                        assert x[0][0] == pytest.approx(y[0][0], abs=1e-3) and x[0][1] == y[0][1]
                    else:
                        assert x[0] == pytest.approx(y[0], abs=1e-3)
            assert a["results"][task] == pytest.approx(b["results"][task], rel=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group("harness_trained")  # one worker builds the module's `trained`
def test_the_cli_writes_harness_metrics_and_compare_shows_them(trained, tmp_path):
    workdir, _, include_path, tasks = trained
    command = [sys.executable, "-m", "diffjax.evaluate", f"--workdir={workdir}", "--tasks=harness"]
    command += [f"--harness_tasks={','.join(tasks)}", f"--harness_include_path={include_path}", "--limit=8"]
    four_devices = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=four_devices)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "harness  corpus_choice acc " in result.stdout and "|corpus_rolling  |" in result.stdout
    [results] = (workdir / "eval").glob("*/results.json")
    harness = json.loads(results.read_text())["tasks"]["harness"]
    assert harness["samples"] == dict.fromkeys(tasks, 8) and harness["requests"] == 8 * (4 + 1 + 1)
    assert 0 <= harness["tasks"][CHOICE]["acc"] <= 1 and harness["tasks"][ROLLING]["bits_per_byte"] > 0
    assert harness["requests_per_s"] > 0
    model, config = load_model(workdir)  # one device here: the batch split over four changed nothing
    from diffjax.evaluate.harness import task_manager

    one_device = lm_eval.simple_evaluate(
        model=DiffjaxLM(model, ByteTokenizer(), config.seq_len), tasks=tasks, limit=8,
        task_manager=task_manager(str(include_path)),
    )  # fmt: skip
    for task in tasks:
        for name, value in harness["tasks"][task].items():
            if value is not None:  # None: a figure the harness could not compute ("N/A")
                assert value == pytest.approx(one_device["results"][task][f"{name},none"], rel=1e-5)

    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    result = subprocess.run(
        [sys.executable, "-m", "diffjax.evaluate", "compare", f"--runs={workdir},{other}", f"--out={tmp_path / 'c'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header = result.stdout.splitlines()[0]
    assert "corpus_choice acc" in header and "corpus_rolling bits_per_byte" in header


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--harness_tasks=arc_easyy"], "unknown harness task 'arc_easyy'; did you mean arc_easy"),
        (["--harness_tasks=arc_easy", "--limit=0"], "--limit=0 must be at least 1"),
    ],
)
def test_bad_harness_input_is_one_line_and_exit_code_2_before_loading(args, message, tmp_path):
    workdir = tmp_path / "missing-checkpoints-are-never-read"
    workdir.mkdir()
    command = [sys.executable, "-m", "diffjax.evaluate", f"--workdir={workdir}", "--tasks=harness", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    ("names", "include_path", "message"),
    [
        ([], "", "--harness_tasks is empty"),
        (["arc_easy"], "/nonexistent", "is not a directory of task YAML"),
        (["corpus_choic"], "", "unknown harness task 'corpus_choic'; (`lm-eval ls tasks`"),
    ],
)
def test_harness_task_names_are_checked_against_the_harness_and_the_include_path(names, include_path, message):
    from diffjax.evaluate.harness import check_tasks

    with pytest.raises(UsageError, match=re.escape(message)):
        check_tasks(names, include_path)


def test_local_tasks_are_found_through_the_include_path(tmp_path):
    from diffjax.evaluate.harness import check_tasks

    check_tasks(write_tasks(tmp_path, 2), str(tmp_path))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model": {"vocab_size": 100}}, "model.vocab_size=100 is smaller than the tokenizer's 259 ids"),
        ({"data": {"tokenizer": "/nonexistent/tokenizer.json"}}, "/nonexistent/tokenizer.json"),
    ],
)
def test_a_run_whose_tokenizer_does_not_fit_is_refused_before_any_request(tmp_path, settings, message):
    from diffjax.config import ConfigError
    from diffjax.evaluate.runner import evaluate
    from diffjax.evaluate.tasks.base import EvalOptions, HarnessOptions, NeedleGrid

    data = load_config(REPO / "configs" / "tiny.py").data
    data.update(settings.get("data", {}))
    save_run(tmp_path / "run", [1], model=settings.get("model"), data=data)
    options = EvalOptions("validation", 1, NeedleGrid((), (), (), 1, 1), harness=HarnessOptions((CHOICE,)))
    with pytest.raises(ConfigError, match=message):
        evaluate(tmp_path / "run", None, ["harness"], options)
    assert not (tmp_path / "run" / "eval").exists()
