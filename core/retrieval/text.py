"""Lexical analysis shared by the retrievers: words, identifiers split into parts, a light stemmer.

Both `bm25` and `light` tokenize documents and questions with ``terms()``, so a question about
"parsing options" finds ``parse_option`` and ``ParseOptions``. No dependency: a third-party
retriever may reuse it.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W_]+(?:_+[^\W_]+)*|[^\W\d_]+", re.UNICODE)
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")

# English function words (and a few words every question has), dropped from documents and queries.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are aren as at be because been before
    being below between both but by can cannot could couldn did didn do does doesn doing don down
    during each few for from further had hadn has hasn have haven having he her here hers herself him
    himself his how i if in into is isn it its itself let me more most mustn my myself no nor not of
    off on once only or other ought our ours ourselves out over own same shan she should shouldn so
    some such than that the their theirs them themselves then there these they this those through to
    too under until up very was wasn we were weren what when where which while who whom why will with
    won would wouldn you your yours yourself yourselves s t ll re ve d m also does doe""".split()
)


def stem(word: str) -> str:
    """A deliberately light suffix stripper (plural, -ing, -ed, -ly, final -e): cheap and predictable."""
    word = _strip_suffix(word)
    if len(word) > 4 and word.endswith("e") and not word.endswith("ee"):
        word = word[:-1]  # "parse" and "parsing" meet at "pars"
    return word


def _strip_suffix(word: str) -> str:
    if len(word) <= 3 or word.isdigit():
        return word
    for suffix, repl, min_len in (
        ("ies", "y", 5), ("sses", "ss", 5), ("ings", "", 7), ("ing", "", 6), ("edly", "", 7),
        ("ed", "", 5), ("ly", "", 6), ("es", "", 5), ("s", "", 4),
    ):
        if word.endswith(suffix) and len(word) >= min_len:
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                return word
            if suffix == "es" and not word.endswith(("ches", "shes", "xes", "sses", "zes")):
                word = word[:-1]  # "values" -> "value", "classes" handled above
                return word
            base = word[: len(word) - len(suffix)] + repl
            # "running" -> "runn" -> "run"
            if suffix in ("ing", "ed", "ings") and len(base) > 2 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]
            return base
    return word


def words(text: str) -> list[str]:
    """Raw words and identifiers as written (``parse_args``, ``HTTPClient``, ``2024``)."""
    return _WORD.findall(text)


def terms(text: str) -> list[str]:
    """Index terms: lowercase, stemmed, stopwords dropped; identifiers also yield their parts."""
    out: list[str] = []
    for word in _WORD.findall(text):
        lower = word.lower()
        parts = [p.lower() for p in _CAMEL.findall(word.replace("_", " "))] if word.isascii() else []
        if len(parts) > 1 or ("_" in word):
            if lower not in STOPWORDS:
                out.append(lower)
            out.extend(stem(p) for p in parts if p not in STOPWORDS and len(p) > 1)
        elif lower not in STOPWORDS and (len(lower) > 1 or lower.isdigit()):
            out.append(stem(lower))
    return out
