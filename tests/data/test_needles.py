import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffjax.data.corpus import python_docs
from diffjax.data.needles import CITIES, NeedleDocument, make_document, min_context_length, split_sentences

FILLER = split_sentences(python_docs("train"))
CHEAPEST = min(len(s.encode("utf-8")) + 1 for s in FILLER)  # bytes one filler sentence adds, with its space
PAPER_GRID = [(1, 1), (2, 2), (4, 2), (6, 2)]  # (num_needles, num_queries) of the paper's 4K table
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0, -1.0]  # -1: random per document


def needle_sentence(city: str, number: str) -> str:
    return f"The magic number for {city} is {number}."


def check_document(doc: NeedleDocument, context_length: int, num_needles: int, num_queries: int, depth: float):
    """Every property the protocol promises, recomputed from the text where possible."""
    body = " ".join(doc.haystack)
    assert doc.text.startswith(body + "\n") and "\n" not in body

    # Needles: N distinct known cities, distinct 7-digit numbers, each sentence exactly once in the haystack.
    cities = [city for city, _ in doc.needles]
    numbers = [number for _, number in doc.needles]
    assert len(doc.needles) == num_needles
    assert len(set(cities)) == num_needles and set(cities) <= set(CITIES)
    assert len(set(numbers)) == num_needles and all(re.fullmatch(r"[1-9]\d{6}", n) for n in numbers)
    sentences = [needle_sentence(city, number) for city, number in doc.needles]
    for sentence, offset in zip(sentences, doc.needle_offsets, strict=True):
        assert body.count(sentence) == 1 and doc.prompt[: len(body)].count(sentence) == 1
        assert doc.text[offset : offset + len(sentence)] == sentence
    assert body.count("magic number") == num_needles

    # Depth: the needles are one block after `before` of the F filler sentences, and |before - depth * F|
    # <= 1/2, i.e. |before / F - depth| is at most half a sentence (written without dividing by F = 0).
    at = [doc.haystack.index(sentence) for sentence in sentences]
    before, num_filler = at[0], len(doc.haystack) - num_needles
    assert at == list(range(before, before + num_needles))
    if depth >= 0:
        assert doc.depth == depth
    else:
        assert 0 <= doc.depth < 1
    assert abs(before - doc.depth * num_filler) <= 0.5 + 1e-9

    # Questions: R distinct needle cities; answers are their numbers; one question and answer per line.
    assert len(doc.cities) == len(set(doc.cities)) == num_queries and set(doc.cities) <= set(cities)
    assert doc.answers == tuple(dict(doc.needles)[city] for city in doc.cities)
    lines = zip(doc.cities, doc.answers, strict=True)
    assert doc.text.split("\n")[1:] == [
        f"What is the magic number for {c}? The magic number for {c} is {a}." for c, a in lines
    ]

    # Prompts: greedy decoding after prompt_for(i) must produce answers[i].
    assert doc.prompt == doc.prompt_for(0) and doc.text.startswith(doc.prompt + " " + doc.answers[0])
    for i, (city, answer) in enumerate(zip(doc.cities, doc.answers, strict=True)):
        prompt = doc.prompt_for(i)
        assert prompt.endswith(f"What is the magic number for {city}? The magic number for {city} is")
        assert doc.text.startswith(prompt + " " + answer + ".")
        assert doc.text[doc.answer_offsets[i] :].startswith(answer)

    # Length: the whole text fits, and filling stopped only when no filler sentence would fit any more.
    assert 0 <= context_length - len(doc.text.encode("utf-8")) < CHEAPEST


def test_split_sentences_gives_clean_one_line_filler():
    assert len(FILLER) > 1000
    for sentence in FILLER:
        assert " ".join(sentence.split()) == sentence and sentence.isascii()
        assert 20 <= len(sentence) <= 300 and sentence.endswith(".")
        assert "magic number" not in sentence.lower()
    text = "Short.  A sentence that\nwraps   over lines.\n\nThe Magic Number for Oslo is 1234567. Not this one?"
    text += "\n\nA sentence with \u201ccurly quotes\u201d is dropped."
    assert split_sentences([text, "    code = 1\n", "Another paragraph of real prose."]) == [
        "A sentence that wraps over lines.",
        "Another paragraph of real prose.",
    ]


def test_cities_are_distinct_real_names_and_never_substrings_of_each_other():
    assert len(CITIES) >= 100 and len(set(CITIES)) == len(CITIES)
    assert all(city.isascii() and city.strip() == city for city in CITIES)
    assert not [(a, b) for a in CITIES for b in CITIES if a != b and a.lower() in b.lower()]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize(("num_needles", "num_queries"), [*PAPER_GRID, (3, 1), (8, 5)])
@pytest.mark.parametrize("context_length", [1200, 4096])
def test_documents_follow_the_protocol(context_length, num_needles, num_queries, depth):
    for index in range(4):
        kwargs = dict(seed=7, context_length=context_length, num_needles=num_needles, num_queries=num_queries)
        doc = make_document(FILLER, index, **kwargs, depth=depth)
        check_document(doc, context_length, num_needles, num_queries, depth)


def test_documents_are_a_pure_function_of_seed_and_index():
    kwargs = dict(context_length=4096, num_needles=4, num_queries=2, depth=-1.0)
    docs = [make_document(FILLER, index, seed=0, **kwargs) for index in range(20)]
    assert docs == [make_document(FILLER, index, seed=0, **kwargs) for index in range(20)]
    assert len({doc.text for doc in docs}) == len(docs)
    assert len({doc.depth for doc in docs}) == len(docs)
    assert make_document(FILLER, 0, seed=1, **kwargs).text != docs[0].text


def test_a_depth_sweep_moves_only_the_needles():
    kwargs = dict(seed=3, context_length=4096, num_needles=4, num_queries=2)
    docs = [make_document(FILLER, 5, **kwargs, depth=depth) for depth in (0.0, 0.5, 1.0)]
    needles = set(docs[0].needles)
    assert all(set(doc.needles) == needles and doc.cities == docs[0].cities for doc in docs)
    assert len({tuple(sorted(doc.haystack)) for doc in docs}) == 1
    assert docs[0].text.startswith("The magic number for ")
    assert docs[2].text.split("\n")[0].endswith(needle_sentence(*docs[2].needles[-1]))


@pytest.mark.parametrize(("num_needles", "num_queries"), [*PAPER_GRID, (len(CITIES), len(CITIES))])
def test_min_context_length_is_tight(num_needles, num_queries):
    smallest = min_context_length(num_needles, num_queries)
    kwargs = dict(seed=0, num_needles=num_needles, num_queries=num_queries, depth=0.5)
    for index in range(20):
        doc = make_document(FILLER, index, context_length=smallest, **kwargs)
        check_document(doc, smallest, num_needles, num_queries, 0.5)
    with pytest.raises(ValueError, match=rf"^context_length={smallest - 1} cannot hold .*use at least {smallest}$"):
        make_document(FILLER, 0, context_length=smallest - 1, **kwargs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_needles=0), r"^num_needles=0 is too small; use at least 1$"),
        (dict(num_needles=len(CITIES) + 1, num_queries=1), rf"^num_needles={len(CITIES) + 1} exceeds .*at most"),
        (dict(num_queries=0), r"^num_queries=0 is out of range; use 1 to num_needles=4$"),
        (dict(num_queries=5), r"^num_queries=5 is out of range; use 1 to num_needles=4$"),
        (dict(depth=1.5), r"^depth=1.5 is past the end; use a depth in \[0, 1\]"),
        (dict(depth=float("nan")), r"^depth=nan is past the end"),
        (dict(context_length=100), r"^context_length=100 cannot hold 4 needles and 2 questions; use at least"),
        (dict(filler=[]), r"^filler is empty; pass sentences from split_sentences"),
    ],
)
def test_bad_arguments_raise_one_line_errors(change, message):
    kwargs = dict(filler=FILLER, index=0, seed=0, context_length=4096, num_needles=4, num_queries=2, depth=0.5)
    with pytest.raises(ValueError, match=message):
        make_document(**(kwargs | change))


@st.composite
def document_arguments(draw):
    num_needles = draw(st.integers(1, 12))
    num_queries = draw(st.integers(1, num_needles))
    context_length = draw(st.integers(min_context_length(num_needles, num_queries), 6000))
    depth = draw(st.one_of(st.floats(0, 1), st.just(-1.0)))
    return context_length, num_needles, num_queries, depth


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 10**9), document_arguments())
def test_any_valid_arguments_give_a_valid_document(seed, index, arguments):
    context_length, num_needles, num_queries, depth = arguments
    doc = make_document(
        FILLER,
        index,
        seed=seed,
        context_length=context_length,
        num_needles=num_needles,
        num_queries=num_queries,
        depth=depth,
    )
    check_document(doc, context_length, num_needles, num_queries, depth)
