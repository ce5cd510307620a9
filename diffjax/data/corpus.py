"""The embedded default corpus: the Python documentation topics every CPython installation ships.

About 0.46 MB of real English prose and code in 79 documents; no download needed. The split is fixed
by a hash of each document's name, so it does not depend on iteration order or Python version.
"""

import zlib
from pydoc_data.topics import topics

VALIDATION_BUCKETS = 10  # one document in ten (by name hash) is held out


def _is_validation(name: str) -> bool:
    return zlib.crc32(name.encode("utf-8")) % VALIDATION_BUCKETS == 0


def python_doc_items(split: str) -> list[tuple[str, str]]:
    """(name, text) of the documents of `split` ('train' or 'validation'), sorted by name."""
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} is unknown; choose 'train' or 'validation'")
    held_out = split == "validation"
    return [(name, topics[name]) for name in sorted(topics) if _is_validation(name) == held_out]


def python_docs(split: str) -> list[str]:
    """Texts of the documents of `split`, sorted by name."""
    return [text for _, text in python_doc_items(split)]
