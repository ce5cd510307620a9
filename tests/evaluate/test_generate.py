import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, save_run
from flax import nnx

from diffjax.cli import UsageError
from diffjax.evaluate.generate import Sampling, generate, sample, until_stop
from diffjax.model import DiffTransformer

SAMPLED = Sampling(temperature=1.0, top_k=20, top_p=0.9)


@pytest.fixture
def split_model(tiny_model_config):
    """A tiny GQA model (2 differential heads over 1 key/value head) whose wide init gives varied greedy output."""

    def build(attention_type: str = "diff") -> tuple[nnx.GraphDef, nnx.State]:
        cfg = dataclasses.replace(tiny_model_config, attention_type=attention_type, init_std=0.3)
        return nnx.split(DiffTransformer(cfg, rngs=nnx.Rngs(0)))

    return build


PROMPT = np.array([[5, 9, 11, 3, 60], [7, 7, 1, 42, 8]], np.int32)  # a length short of its bucket (16)


@pytest.mark.parametrize("attention_type", ["diff", "diff_v2", "standard"])
def test_kv_cache_decoding_gives_the_tokens_of_full_recomputation(split_model, attention_type):
    graphdef, params = split_model(attention_type)
    greedy = generate(graphdef, params, PROMPT, 32).tokens
    assert greedy.shape == (2, 32) and len(set(greedy[0])) > 4  # not a degenerate repetition
    np.testing.assert_array_equal(greedy, generate(graphdef, params, PROMPT, 32, use_cache=False).tokens)
    sampled = generate(graphdef, params, PROMPT, 32, SAMPLED, seed=7).tokens
    recomputed = generate(graphdef, params, PROMPT, 32, SAMPLED, seed=7, use_cache=False).tokens
    np.testing.assert_array_equal(sampled, recomputed)
    assert not np.array_equal(sampled, greedy)


def test_greedy_tokens_are_the_models_argmax_at_the_position_before(split_model):
    graphdef, params = split_model()
    greedy = generate(graphdef, params, PROMPT, 32).tokens
    logits = nnx.merge(graphdef, params)(jnp.concatenate([PROMPT, greedy], axis=1))
    np.testing.assert_array_equal(greedy, jnp.argmax(logits[:, PROMPT.shape[1] - 1 : -1], axis=-1))


def test_a_row_stops_at_its_stop_id_and_keeps_it(split_model):
    graphdef, params = split_model()
    free = generate(graphdef, params, PROMPT, 32).tokens[0]
    stop = int(free[4])
    first = list(free).index(stop)
    stopped = generate(graphdef, params, PROMPT, 32, stop_id=stop).tokens[0]
    np.testing.assert_array_equal(stopped[: first + 1], free[: first + 1])
    assert (stopped[first:] == stop).all()
    np.testing.assert_array_equal(until_stop(stopped, stop), free[: first + 1])
    np.testing.assert_array_equal(until_stop(free, None), free)


def test_a_row_also_stops_at_any_of_also_stop_and_then_repeats_stop_id(split_model):
    graphdef, params = split_model()
    free = generate(graphdef, params, PROMPT, 32).tokens[0]
    others = [int(t) for t in free[5:] if t not in free[:5]]
    also, eos = [int(free[3]), int(free[4]), *others[:1]], int(free[-1]) + 1
    first = min(list(free).index(t) for t in also)
    stopped = generate(graphdef, params, PROMPT, 32, stop_id=eos, also_stop=also).tokens[0]
    np.testing.assert_array_equal(stopped[: first + 1], free[: first + 1])
    assert (stopped[first + 1 :] == eos).all()


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.3, 0.15]]))
    keys = jax.random.split(jax.random.key(0), 2000)

    def drawn(sampling: Sampling) -> set[int]:
        return set(np.asarray(jax.vmap(lambda key: sample(logits, key, sampling))(keys)).ravel().tolist())

    assert drawn(Sampling()) == {1}  # temperature 0: argmax, whatever the key
    assert drawn(Sampling(temperature=1.0)) == {0, 1, 2, 3}
    assert drawn(Sampling(temperature=1.0, top_k=2)) == {1, 2}
    assert drawn(Sampling(temperature=1.0, top_p=0.75)) == {1, 2}  # 0.5 falls short, 0.5 + 0.3 reaches it
    assert drawn(Sampling(temperature=1.0, top_p=0.85)) == {1, 2, 3}
    assert drawn(Sampling(temperature=1.0, top_k=3, top_p=0.5)) == {1}
    assert drawn(Sampling(temperature=100.0, top_k=1)) == {1}


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "sampling", "message"),
    [
        ([], 4, Sampling(), "non-empty"),
        ([3, 64], 4, Sampling(), r"prompt ids must be in \[0, 64\)"),
        ([3], 0, Sampling(), "max_tokens=0"),
        ([3], 4, Sampling(temperature=-1.0), "temperature=-1.0"),
        ([3], 4, Sampling(top_k=-2), "top_k=-2"),
        ([3], 4, Sampling(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    ],
)
def test_bad_arguments_are_usage_errors(split_model, prompt, max_tokens, sampling, message):
    graphdef, params = split_model()
    with pytest.raises(UsageError, match=message):
        generate(graphdef, params, np.array(prompt, np.int32), max_tokens, sampling)


def test_cli_prints_the_continuation_and_refuses_bad_input_with_one_line(tmp_path):
    save_run(tmp_path, [2])
    runs = {
        "ok": [
            f"--workdir={tmp_path}",
            "--prompt=The ",
            "--prompt=def ",
            "--max_tokens=8",
            "--temperature=0.8",
            "--top_k=5",
        ],
        "no workdir": [f"--workdir={tmp_path / 'nothing'}", "--prompt=The "],
        "no step": [f"--workdir={tmp_path}", "--step=7", "--prompt=The "],
        "empty prompt": [f"--workdir={tmp_path}", "--prompt="],
        "bad top_p": [f"--workdir={tmp_path}", "--prompt=The ", "--top_p=1.5"],
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "diffjax.generate", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in runs.items()
    }
    results = {name: (process, *process.communicate(timeout=300)) for name, process in processes.items()}
    process, out, err = results.pop("ok")
    assert process.returncode == 0, err[-3000:]
    assert out.startswith("The ") and "\ndef " in out and out.count("step 2: ") == 2 and "tokens/s" in out
    expected = {
        "no workdir": "no checkpoint at",
        "no step": "no checkpoint of step 7",
        "empty prompt": "--prompt is required and must not be empty",
        "bad top_p": "top_p=1.5 must be in (0, 1]",
    }
    for name, (process, _, err) in results.items():
        lines = err.strip().splitlines()
        assert process.returncode == 2 and len(lines) == 1, (name, err[-3000:])
        assert lines[0].startswith("python -m diffjax.generate: error: ") and expected[name] in lines[0], lines[0]
