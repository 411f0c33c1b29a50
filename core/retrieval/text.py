"""Lexical analysis shared by the retrievers: words, identifiers split into parts, stems.

Both `bm25` and `light` tokenize documents and questions with ``terms()``, so a question about
"parsing options" finds ``parse_option`` and ``ParseOptions`` (bm25s's own tokenizer does not
split identifiers; its stopword list and PyStemmer do the rest). A third-party retriever may
reuse it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

_WORD = re.compile(r"[^\W_]+(?:_+[^\W_]+)*|[^\W\d_]+", re.UNICODE)
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


@functools.cache
def _analyzer() -> tuple[frozenset[str], Callable[[str], str]]:
    """English stopwords (bm25s's NLTK-derived ``STOPWORDS_EN_PLUS``: its short Lucene list
    ``"en"`` keeps "what", "does", "how", which every question has) and the Snowball English
    stemmer (PyStemmer), loaded on first use: plugin modules load when ``spl --help`` runs."""
    import Stemmer
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    return frozenset(STOPWORDS_EN_PLUS), Stemmer.Stemmer("english").stemWord


def words(text: str) -> list[str]:
    """Raw words and identifiers as written (``parse_args``, ``HTTPClient``, ``2024``)."""
    return _WORD.findall(text)


def terms(text: str) -> list[str]:
    """Index terms: lowercase, stemmed, stopwords dropped; identifiers also yield their parts."""
    stopwords, stem_word = _analyzer()
    out: list[str] = []
    for word in _WORD.findall(text):
        lower = word.lower()
        parts = [p.lower() for p in _CAMEL.findall(word.replace("_", " "))] if word.isascii() else []
        if len(parts) > 1 or ("_" in word):
            if lower not in stopwords:
                out.append(lower)
            out.extend(stem_word(p) for p in parts if p not in stopwords and len(p) > 1)
        elif lower not in stopwords and (len(lower) > 1 or lower.isdigit()):
            out.append(stem_word(lower))
    return out
