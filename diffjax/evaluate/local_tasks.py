"""Three small lm-evaluation-harness tasks over the embedded corpus's validation split, one per request type,
written as task YAML over local JSON files: the harness path checked offline, with no dataset download.

    python -m diffjax.evaluate.local_tasks --out=harness_tasks
    python -m diffjax.evaluate --workdir=runs/tiny_diff --tasks=harness --harness_include_path=harness_tasks \\
        --harness_tasks=corpus_choice,corpus_rolling,corpus_next_word

- `corpus_choice` (multiple choice, `loglikelihood`): which of four line endings follows a line's start;
  the wrong ones end other lines.
- `corpus_rolling` (`loglikelihood_rolling`): word/byte perplexity and bits per byte of text passages,
  longer than the tiny model's length, so they are scored in several windows.
- `corpus_next_word` (`generate_until`): the word after a line's first words, greedy, until a space.
"""

import json
from pathlib import Path

from absl import flags

from diffjax.cli import UsageError, run_main
from diffjax.data import corpus

TASKS = ("corpus_choice", "corpus_rolling", "corpus_next_word")
CHOICES = 4
PREFIX, ENDING = 32, 16  # characters of a line's start and of each choice


def _lines() -> list[str]:
    """Prose lines of the validation split long enough for a start and an ending, in corpus order."""
    lines = (line.strip() for document in corpus.python_docs("validation") for line in document.splitlines())
    return [line for line in lines if len(line) >= PREFIX + ENDING and " " in line[PREFIX // 2 :]]


def choice_items(count: int) -> list[dict]:
    lines = _lines()
    step = max(1, len(lines) // count)
    picked = lines[::step][:count]
    items = []
    for i, line in enumerate(picked):
        others = [picked[(i + k * 7) % len(picked)][PREFIX : PREFIX + ENDING] for k in range(1, CHOICES)]
        answer = i % CHOICES
        choices = [*others[:answer], line[PREFIX : PREFIX + ENDING], *others[answer:]]
        items.append({"context": line[:PREFIX], "choices": choices, "answer": answer})
    return items


def rolling_items(count: int, characters: int = 320) -> list[dict]:
    text = "\n".join(corpus.python_docs("validation"))
    step = max(characters, len(text) // count)
    return [{"text": text[start : start + characters]} for start in range(0, step * count, step)]


def next_word_items(count: int, words: int = 5) -> list[dict]:
    lines = [line.split() for line in _lines()]
    lines = [line for line in lines if len(line) > words]
    step = max(1, len(lines) // count)
    return [{"prompt": " ".join(line[:words]) + " ", "answer": line[words]} for line in lines[::step][:count]]


def _task_yaml(name: str, data: Path, body: str) -> str:
    header = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
    return header + "test_split: test\n" + body


BODIES = {
    "corpus_choice": (
        choice_items,
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    ),
    "corpus_rolling": (
        rolling_items,
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    ),
    "corpus_next_word": (
        next_word_items,
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [' ', '\\n']\n  max_gen_toks: 24\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n",
    ),
}


def write_tasks(out: Path, count: int = 40) -> list[str]:
    """Write the tasks' JSON and YAML files (`count` items each) into `out`; their names."""
    out.mkdir(parents=True, exist_ok=True)
    for name, (items, body) in BODIES.items():
        data = (out / f"{name}.json").absolute()
        data.write_text(json.dumps(items(count), indent=1) + "\n")
        (out / f"{name}.yaml").write_text(_task_yaml(name, data, body))
    return list(TASKS)


def main(argv: list[str]) -> None:
    out, count = flags.FLAGS.out, flags.FLAGS.count
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}")
    if not out:
        raise UsageError("pass --out=<directory for the task files>")
    if count < 1:
        raise UsageError(f"--count={count} must be at least 1")
    names = write_tasks(Path(out).expanduser(), count)
    print(f"wrote {', '.join(names)} to {out}: pass --harness_include_path={out}")


if __name__ == "__main__":  # flags defined here only, so that importing the tasks defines no flag
    flags.DEFINE_string("out", None, "Directory for the task files (pass it as --harness_include_path).")
    flags.DEFINE_integer("count", 40, "Items per task.")
    run_main("python -m diffjax.evaluate.local_tasks", main)
