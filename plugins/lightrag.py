"""Built-in plugin ``lightrag``: the ``light`` retriever, index-free, for quick questions over
small folders.

It keeps nothing on disk: a search tokenizes the workspace's passages (kept in memory for the
last workspace searched, e.g. during a `spl docs` session), computes the inverse document frequency of
the question's terms over them on the fly and scores each passage by

    sum over matched terms of idf(t) * (1 + log tf)  /  length damping
    x (0.5 + share of the question's idf mass the passage covers)
    + a bonus for each pair of adjacent question terms that are adjacent in the passage.

So a passage that covers more of the question, and keeps its phrases together, wins — no index
to build, nothing to rebuild when files change. It is a plugin of its own to show that a
retriever needs nothing but core (``superlinear.retrieval``): `spl rag ask --retriever light`.
"""

from __future__ import annotations

import math
from collections import Counter

from superlinear.hookspecs import hookimpl

_RECENT: dict[str, tuple[str, list]] = {}  # workspace folder -> (version, analysed passages): the last one only


class LightRetriever:
    name = "light"

    def __init__(self, workspace):
        self.workspace = workspace
        key = str(getattr(workspace, "path", id(workspace)))
        self._version, self._docs = _RECENT.get(key, (None, []))
        self._key = key

    def _analyse(self):
        from superlinear.retrieval import indexed_text
        from superlinear.retrieval.text import terms

        chunks = self.workspace.chunks()
        if self._version != self.workspace.version or len(self._docs) != len(chunks):
            docs = []
            for chunk in chunks:
                toks = terms(indexed_text(chunk))
                docs.append((Counter(toks), set(zip(toks, toks[1:], strict=False)), len(toks)))
            self._docs, self._version = docs, self.workspace.version
            _RECENT.clear()
            _RECENT[self._key] = (self._version, docs)
        return chunks, self._docs

    def search(self, query: str, k: int):
        from superlinear.retrieval import Passage
        from superlinear.retrieval.text import terms

        q_terms = terms(query)
        distinct = list(dict.fromkeys(q_terms))
        if not distinct:
            return []
        chunks, docs = self._analyse()
        n = len(docs)
        if n == 0:
            return []
        df = {t: sum(1 for counts, _, _ in docs if t in counts) for t in distinct}
        idf = {t: math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in distinct if df[t]}
        if not idf:
            return []
        mass = sum(idf.values())
        avg_len = sum(length for _, _, length in docs) / n or 1.0
        pairs = [(a, b) for a, b in zip(q_terms, q_terms[1:], strict=False) if a in idf and b in idf]
        scored = []
        for i, (counts, bigrams, length) in enumerate(docs):
            matched = [t for t in idf if t in counts]
            if not matched:
                continue
            base = sum(idf[t] * (1 + math.log(counts[t])) for t in matched)
            base /= 1 + 0.3 * math.log1p(length / avg_len)
            coverage = sum(idf[t] for t in matched) / mass
            bonus = sum(0.5 * (idf[a] + idf[b]) for a, b in pairs if (a, b) in bigrams)
            scored.append((base * (0.5 + coverage) + bonus, i))
        scored.sort(key=lambda s: (-s[0], s[1]))
        return [Passage(chunks[i], score, self.name) for score, i in scored[:k]]


@hookimpl
def register_retrievers(register):
    register("light", LightRetriever)
