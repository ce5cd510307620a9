"""diffjax models in EleutherAI's lm-evaluation-harness, natively (no PyTorch export in between).

    from diffjax import load_model
    from diffjax.data.tokenizer import load_tokenizer
    model, config = load_model("runs/tiny_diff")
    lm = DiffjaxLM(model, load_tokenizer(config.data.tokenizer), max_length=config.seq_len)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], task_manager=task_manager())

The harness's `TemplateLM` turns requests into token ids exactly as its `hf` model does (trailing spaces
of a context move to the continuation; the continuation's ids are those of context + continuation past
the context's), so scores are comparable with an exported model's. Contexts start with BOS, as every
document did in training (and as the exported tokenizer encodes them, so the `hf` model on the export sees
the same ids). Sequences are scored in batches padded to one of four lengths per doubling, so a task
compiles a handful of programs; the batch is split over every device the parameters live on.
"""

import contextlib
import difflib
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from diffjax.cli import UsageError
from diffjax.data.tokenizer import Tokenizer
from diffjax.evaluate.generate import GREEDY, MIN_BUCKET, Sampling, generate, prompt_bucket, until_stop
from diffjax.evaluate.load import LoadedModel

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for tasks that set no `max_gen_toks`


@functools.cache
def task_manager(include_path: str = "") -> TaskManager:
    """The harness's task index (its own tasks, and the YAML files under `include_path`); built once."""
    return TaskManager(include_path=include_path or None)


def check_tasks(names: Sequence[str], include_path: str = "") -> None:
    """`UsageError` naming the tasks the harness does not know, with the nearest known names."""
    if include_path and not Path(include_path).expanduser().is_dir():
        raise UsageError(f"--harness_include_path={include_path} is not a directory of task YAML files")
    if not names:
        raise UsageError("--harness_tasks is empty; name lm-evaluation-harness tasks, e.g. arc_easy,hellaswag")
    known = task_manager(include_path).all_tasks
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise UsageError(
                f"unknown harness task {name!r}; {hint}(`lm-eval ls tasks` lists them; your own task YAMLs need "
                "--harness_include_path=DIR)"
            )


@functools.partial(jax.jit, static_argnums=0)
def token_scores(
    graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`[B, T]` log-probability of each target after the tokens up to it, and whether it is the argmax."""
    logits = nnx.merge(graphdef, params)(tokens).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return chosen, jnp.argmax(logits, axis=-1) == targets


def length_bucket(length: int, max_length: int) -> int:
    """The padded length of a batch whose longest sequence has `length` tokens: four buckets per doubling
    (at most a third of a batch is padding, against up to half with powers of two), from `MIN_BUCKET`."""
    step = max(MIN_BUCKET, prompt_bucket(length) // 4)
    return min(-(-length // step) * step, max(max_length, MIN_BUCKET))


class DiffjaxLM(TemplateLM):
    """A loaded diffjax checkpoint as a harness `LM`: `loglikelihood`, `loglikelihood_rolling`, `generate_until`.

    Sequences longer than `max_length` tokens keep their last `max_length` (the context is cut from the left,
    as the `hf` model cuts it); how many were cut is said once per request type.
    """

    def __init__(
        self,
        model: LoadedModel,
        tokenizer: Tokenizer,
        max_length: int,
        batch_size: int = 16,
        seed: int = 0,
        log: Callable[[str], None] = print,
    ):
        super().__init__()
        self.model, self.tokenizer, self._max_length = model, tokenizer, max_length
        self.seed, self.log = seed, log
        mesh = jax.tree.leaves(model.params)[0].sharding.mesh
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self.batch_size = -(-batch_size // mesh.size) * mesh.size  # whole rows on every device
        self.requests = 0
        self.seconds = 0.0
        self._stops: dict[tuple[str, ...], tuple[int, ...]] = {}

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The text's ids after BOS (without it when `add_special_tokens` is False)."""
        ids = self.tokenizer.encode(string).tolist()
        return ids if add_special_tokens is False else [self.tokenizer.bos_id, *ids]

    def tok_decode(self, tokens: Iterable[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        with self._timed(len(requests)):
            return self.score([(context, continuation) for _, context, continuation in requests], disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text after BOS, in disjoint windows of `max_length` tokens."""
        with self._timed(len(requests)):
            windows, owners = [], []
            for index, (text,) in enumerate(request.args for request in requests):
                tokens = self.tok_encode(text, add_special_tokens=False)
                rolling = utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
                for window in map(utils.make_disjoint_window, rolling):
                    windows.append(window)
                    owners.append(index)
            totals = np.zeros(len(requests))
            np.add.at(totals, owners, [logprob for logprob, _ in self.score(windows, disable_tqdm)])
            return totals.tolist()

    def score(
        self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each continuation after its context: one forward pass per batch of
        sequences of similar length (longest first, so the first batch shows the memory a task needs)."""
        for _, continuation in pairs:
            if not 0 < len(continuation) <= self.max_length:
                raise UsageError(
                    f"a harness request continues with {len(continuation)} tokens; the model scores 1 to "
                    f"{self.max_length} (its seq_len): choose tasks whose answers fit"
                )
        sequences = [(context + continuation)[-(self.max_length + 1) :] for context, continuation in pairs]
        self._say_truncated(sum(len(c) + len(t) > self.max_length + 1 for c, t in pairs), len(pairs), "scored")
        order = sorted(range(len(pairs)), key=lambda i: -len(sequences[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc="harness scoring", unit="batch", disable=disable_tqdm):
            rows = order[start : start + self.batch_size]
            width = length_bucket(len(sequences[rows[0]]) - 1, self.max_length)
            tokens = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            for row, index in enumerate(rows):
                sequence = sequences[index]
                tokens[row, : len(sequence) - 1] = sequence[:-1]
                targets[row, : len(sequence) - 1] = sequence[1:]
            logprobs, greedy = token_scores(
                self.model.graphdef, self.model.params, *jax.device_put((tokens, targets), self._batch_sharding)
            )
            logprobs, greedy = np.asarray(logprobs), np.asarray(greedy)
            for row, index in enumerate(rows):
                end = len(sequences[index]) - 1
                scored = slice(end - len(pairs[index][1]), end)
                results[index] = (float(logprobs[row, scored].sum()), bool(greedy[row, scored].all()))
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Decoded continuations, cut before the first stop string. Requests sharing a context length and
        generation settings decode together with the KV cache, until every row has produced EOS or a token
        holding a stop string, or `max_gen_toks`."""
        with self._timed(len(requests)):
            groups: dict[tuple, list[int]] = {}
            prepared = []
            for index, (context, gen_kwargs) in enumerate(request.args for request in requests):
                settings = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
                until = handle_stop_sequences(settings.pop("until", None), eos=None)
                max_tokens = settings.pop("max_gen_toks")
                if max_tokens >= self.max_length:
                    raise UsageError(
                        f"a harness task asks for {max_tokens} generated tokens; the model's length is "
                        f"{self.max_length} (its seq_len): pass a task with a smaller max_gen_toks"
                    )
                ids, room = self.tok_encode(context), self.max_length - max_tokens
                prepared.append((ids[-room:], until, len(ids) > room))
                sampling = _sampling(settings)
                groups.setdefault((len(prepared[-1][0]), max_tokens, sampling, tuple(until)), []).append(index)
            self._say_truncated(sum(cut for *_, cut in prepared), len(prepared), "generated from")
            outputs = [""] * len(requests)
            for (_, max_tokens, sampling, _), members in tqdm(
                groups.items(), desc="harness generating", unit="group", disable=disable_tqdm
            ):
                for start in range(0, len(members), self.batch_size):
                    rows = members[start : start + self.batch_size]
                    prompts = np.asarray([prepared[index][0] for index in rows], np.int32)
                    # rows repeated up to a power of two, so that few batch shapes are compiled
                    padded = np.resize(prompts, (1 << (len(rows) - 1).bit_length(), prompts.shape[1]))
                    tokens = generate(
                        self.model.graphdef,
                        self.model.params,
                        padded,
                        max_tokens,
                        sampling,
                        seed=self.seed,
                        stop_id=self.eot_token_id,
                        also_stop=self._stop_ids(tuple(prepared[rows[0]][1])),
                    ).tokens
                    for row, index in enumerate(rows):
                        kept = until_stop(tokens[row], self.eot_token_id)
                        text = self.tok_decode(kept[kept != self.eot_token_id])
                        outputs[index] = postprocess_generated_text(text, prepared[index][1], None)
            return outputs

    def _stop_ids(self, until: tuple[str, ...]) -> tuple[int, ...]:
        """Ids whose text holds a whole stop string: decoding may end at them, as the text is cut there anyway
        (stop strings spread over several tokens are only cut afterwards)."""
        if until not in self._stops:
            texts = (self.tok_decode([i]) for i in range(self.tokenizer.vocab_size))
            self._stops[until] = tuple(i for i, text in enumerate(texts) if any(s and s in text for s in until))
        return self._stops[until]

    def _say_truncated(self, truncated: int, total: int, what: str) -> None:
        if truncated:
            self.log(
                f"harness: {truncated} of {total} requests {what} were longer than the model's {self.max_length} "
                f"tokens; each kept its last tokens (the context is cut from the left, as the hf model does)"
            )

    @contextlib.contextmanager
    def _timed(self, requests: int) -> Iterator[None]:
        """Add a call's requests and wall time to the totals (requests/s in results.json)."""
        started = time.perf_counter()
        yield
        self.requests += requests
        self.seconds += time.perf_counter() - started


def _sampling(settings: dict[str, Any]) -> Sampling:
    """Greedy unless the task samples; then its temperature, top_k and top_p (the harness's names)."""
    if not settings.get("do_sample") or not settings.get("temperature"):
        return GREEDY
    temperature, top_k, top_p = settings["temperature"], settings.get("top_k") or 0, settings.get("top_p", 1)
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    sampling.check()
    return sampling
