"""Synthetic multi-needle retrieval documents (the paper's N-needle / R-query protocol, SPEC.md section 7).

A document is a haystack of real filler sentences with N needles "The magic number for CITY is NUMBER."
inserted as one consecutive block at a relative depth, followed by R questions, one per line:

    <filler> ... The magic number for Oslo is 4821907. The magic number for Lima is 1093346. <filler> ...
    What is the magic number for Lima? The magic number for Lima is 1093346.
    What is the magic number for Oslo? The magic number for Oslo is 4821907.

`text` is that whole string (a language-modelling example that teaches retrieval); `prompt_for(i)` is `text`
cut right before the i-th answer (earlier answers filled in), so greedy decoding after it should produce
`answers[i]`. Documents are pure functions of (seed, index, parameters); nothing is read or downloaded.
"""

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Real cities, ASCII only (so character offsets are byte offsets), none a substring of another (so a
# needle or question can never match a different city's).
CITIES: tuple[str, ...] = (
    "Amsterdam", "Athens", "Auckland", "Baghdad", "Bangkok", "Barcelona", "Beijing", "Beirut", "Belgrade",
    "Berlin", "Bogota", "Boston", "Brisbane", "Brussels", "Bucharest", "Budapest", "Buenos Aires", "Cairo",
    "Calgary", "Cape Town", "Caracas", "Casablanca", "Chicago", "Copenhagen", "Dakar", "Dallas", "Damascus",
    "Denver", "Dhaka", "Dubai", "Dublin", "Edinburgh", "Florence", "Frankfurt", "Geneva", "Glasgow", "Hamburg",
    "Hanoi", "Havana", "Helsinki", "Hong Kong", "Honolulu", "Houston", "Istanbul", "Jakarta", "Jerusalem",
    "Johannesburg", "Kabul", "Karachi", "Kathmandu", "Khartoum", "Kyoto", "Lagos", "Lima", "Lisbon",
    "Liverpool", "London", "Los Angeles", "Luxembourg", "Lyon", "Madrid", "Manchester", "Manila", "Marseille",
    "Melbourne", "Mexico City", "Miami", "Milan", "Montreal", "Moscow", "Mumbai", "Munich", "Nairobi", "Naples",
    "New Orleans", "New York", "Osaka", "Oslo", "Ottawa", "Paris", "Prague", "Quito", "Reykjavik",
    "Rio de Janeiro", "Rome", "San Francisco", "Santiago", "Sao Paulo", "Seattle", "Seoul", "Shanghai",
    "Singapore", "Stockholm", "Sydney", "Taipei", "Tehran", "Tel Aviv", "Tokyo", "Toronto", "Tunis",
    "Vancouver", "Venice", "Vienna", "Warsaw", "Zurich",
)  # fmt: skip

NUMBER_DIGITS = 7
NEEDLE = "The magic number for {city} is {number}."
QUESTION = "What is the magic number for {city}? The magic number for {city} is"
MIN_SENTENCE, MAX_SENTENCE = 20, 300

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass(frozen=True)
class NeedleDocument:
    """One retrieval example. Offsets are character offsets into `text` (byte offsets for ASCII filler)."""

    text: str  # " ".join(haystack) + "\n" + one "question answer." line per query, joined by "\n"
    haystack: tuple[str, ...]  # filler and needle sentences in order
    needles: tuple[tuple[str, str], ...]  # all N (city, number) pairs in document order
    cities: tuple[str, ...]  # the R queried cities, in question order
    answers: tuple[str, ...]  # their numbers, in question order
    depth: float  # the requested depth, or the one drawn when a random depth was asked for
    needle_offsets: tuple[int, ...]  # where each needle sentence starts, in document order
    answer_offsets: tuple[int, ...]  # where each answer starts, in question order

    @property
    def prompt(self) -> str:
        """What the model sees before its first answer."""
        return self.prompt_for(0)

    def prompt_for(self, query: int) -> str:
        """`text` up to (without the space before) the answer of `query`, earlier answers filled in."""
        return self.text[: self.answer_offsets[query] - 1]


def split_sentences(texts: Iterable[str]) -> list[str]:
    """Clean one-line ASCII prose sentences of 20-300 characters ending in '.', for use as filler.

    Sentences mentioning "magic number" are dropped, so every needle is unique in its document.
    """
    sentences = []
    for text in texts:
        for paragraph in _PARAGRAPH_BREAK.split(text):
            sentences += filter(_is_filler, _SENTENCE_BREAK.split(" ".join(paragraph.split())))
    return sentences


def _is_filler(sentence: str) -> bool:
    return (
        MIN_SENTENCE <= len(sentence) <= MAX_SENTENCE
        and sentence.endswith(".")
        and sentence.isascii()
        and "magic number" not in sentence.lower()
    )


def _cost(sentence: str) -> int:
    """UTF-8 bytes a haystack sentence or question line adds to `text`, with its separator."""
    return len(sentence.encode("utf-8")) + 1


def _needle(city: str, number: str) -> str:
    return NEEDLE.format(city=city, number=number)


def _qa_line(city: str, number: str) -> str:
    return f"{QUESTION.format(city=city)} {number}."


def min_context_length(num_needles: int, num_queries: int) -> int:
    """Smallest `context_length` that holds any N needles and R questions (the longest cities) without filler."""
    longest = sorted(CITIES, key=len, reverse=True)
    number = "0" * NUMBER_DIGITS
    needles = sum(_cost(_needle(city, number)) for city in longest[:num_needles])
    questions = sum(_cost(_qa_line(city, number)) for city in longest[:num_queries])
    return needles + questions - 1  # the last line has no separator


def _validate(filler: Sequence[str], context_length: int, num_needles: int, num_queries: int, depth: float) -> None:
    if num_needles < 1:
        raise ValueError(f"num_needles={num_needles} is too small; use at least 1")
    if num_needles > len(CITIES):
        raise ValueError(f"num_needles={num_needles} exceeds the {len(CITIES)} cities; use at most {len(CITIES)}")
    if not 1 <= num_queries <= num_needles:
        raise ValueError(f"num_queries={num_queries} is out of range; use 1 to num_needles={num_needles}")
    if not depth <= 1:
        raise ValueError(f"depth={depth} is past the end; use a depth in [0, 1], or a negative one for a random depth")
    needed = min_context_length(num_needles, num_queries)
    if context_length < needed:
        raise ValueError(
            f"context_length={context_length} cannot hold {num_needles} needles and {num_queries} questions; "
            f"use at least {needed}"
        )
    if not filler:
        raise ValueError("filler is empty; pass sentences from split_sentences(python_docs('train'))")


def _fill(filler: Sequence[str], start: int, budget: int) -> list[str]:
    """Filler sentences from `start` on (cyclically) whose costs sum to at most `budget`.

    A sentence that does not fit is skipped rather than ending the haystack, so the budget left over is
    smaller than the cheapest filler sentence's cost.
    """
    costs = [_cost(sentence) for sentence in filler]
    cheapest = min(costs)
    chosen = []
    position = start
    while budget >= cheapest:
        i = position % len(filler)
        if costs[i] <= budget:
            chosen.append(filler[i])
            budget -= costs[i]
        position += 1
    return chosen


def _offsets(start: int, pieces: Sequence[str]) -> list[int]:
    """Character offset of each of `pieces` when they are joined by one-character separators from `start` on."""
    return list(itertools.accumulate((len(piece) + 1 for piece in pieces[:-1]), initial=start))


def make_document(
    filler: Sequence[str],
    index: int,
    *,
    seed: int,
    context_length: int,
    num_needles: int,
    num_queries: int,
    depth: float,
) -> NeedleDocument:
    """Document `index` of the split drawn with `seed`: a pure function of its arguments.

    Length: `context_length` bounds the UTF-8 bytes of the whole `text` (haystack, newline, every question
    with its answer), so every prompt fits too; filler is added until less than the cheapest filler
    sentence (plus its space) would be left. Reserve room for BOS/EOS tokens outside `context_length`.

    Depth: the N needles form one consecutive block after round(depth * F) of the F filler sentences (0 is
    the start of the haystack, 1 its end, right before the questions); a negative depth draws one
    uniformly from [0, 1) per document. The depth draws no other random numbers, so documents of one
    (seed, index) at different depths hold the same needles, questions and filler.
    """
    _validate(filler, context_length, num_needles, num_queries, depth)
    rng = np.random.default_rng([seed, index])
    cities = [CITIES[i] for i in rng.choice(len(CITIES), num_needles, replace=False)]
    low = 10 ** (NUMBER_DIGITS - 1)
    numbers = [str(low + n) for n in rng.choice(9 * low, num_needles, replace=False)]
    queried = rng.choice(num_needles, num_queries, replace=False)
    start = int(rng.integers(len(filler)))
    if depth < 0:
        depth = float(rng.random())

    needles = [_needle(city, number) for city, number in zip(cities, numbers, strict=True)]
    questions = [QUESTION.format(city=cities[q]) for q in queried]
    lines = [_qa_line(cities[q], numbers[q]) for q in queried]
    budget = context_length + 1 - sum(map(_cost, needles + lines))
    fill = _fill(filler, start, budget)
    at = round(depth * len(fill))
    haystack = fill[:at] + needles + fill[at:]

    body = " ".join(haystack)
    line_offsets = _offsets(len(body) + 1, lines)
    return NeedleDocument(
        text=body + "\n" + "\n".join(lines),
        haystack=tuple(haystack),
        needles=tuple(zip(cities, numbers, strict=True)),
        cities=tuple(cities[q] for q in queried),
        answers=tuple(numbers[q] for q in queried),
        depth=depth,
        needle_offsets=tuple(_offsets(0, haystack)[at : at + num_needles]),
        answer_offsets=tuple(offset + len(q) + 1 for offset, q in zip(line_offsets, questions, strict=True)),
    )
