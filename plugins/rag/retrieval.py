"""The retrievers the ``register_retrievers`` hook provides (their contract is
``superlinear.retrieval``), searching with one, and the built-in ``bm25``. See docs/rag.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from superlinear.errors import InvalidRequest
from superlinear.retrieval import Passage, Retriever, indexed_text
from superlinear.retrieval.text import terms

from .workspace import Workspace

RetrieverFactory = Callable[[Workspace], Retriever]

DEFAULT_RETRIEVER = "bm25"


def available_retrievers() -> dict[str, tuple[str, RetrieverFactory]]:
    """name -> (plugin name, factory), from every plugin's ``register_retrievers``."""
    from superlinear.pluginloader import collect

    found: dict[str, tuple[str, RetrieverFactory]] = {}
    for plugin, args, kwargs in collect("register_retrievers"):
        name = args[0] if args else kwargs.get("name")
        factory = args[1] if len(args) > 1 else kwargs.get("factory")
        if isinstance(name, str) and callable(factory) and name not in found:
            found[name] = (plugin, factory)
    return found


def get_retriever(name: str, workspace: Workspace) -> Retriever:
    retrievers = available_retrievers()
    if name not in retrievers:
        raise InvalidRequest(f"unknown retriever {name!r} (available: {', '.join(sorted(retrievers)) or 'none'})",
                             param="retriever")
    return retrievers[name][1](workspace)


def search(workspace: Workspace, query: str, k: int, retriever: str = DEFAULT_RETRIEVER) -> list[Passage]:
    if k < 1:
        raise InvalidRequest("k must be at least 1", param="k")
    if not query.strip():
        raise InvalidRequest("the question is empty", param="question")
    found = get_retriever(retriever, workspace).search(query, k)
    return [p if p.retriever else Passage(p.chunk, p.score, retriever) for p in found[:k]]


class BM25Retriever:
    """Okapi BM25 (bm25s) over ``indexed_text`` terms; the index lives in ``index_dir("bm25")``
    and is rebuilt when the workspace's passages change."""

    name = "bm25"

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._model: Any = None

    def ensure_index(self) -> Any:
        if self._model is not None:
            return self._model
        import bm25s

        folder = self.workspace.index_dir(self.name)
        stamp = folder / "spl.json"
        chunks = self.workspace.chunks()
        if chunks and stamp.is_file() and json.loads(stamp.read_text()).get("version") == self.workspace.version:
            self._model = bm25s.BM25.load(str(folder), show_progress=False)
            return self._model
        model = bm25s.BM25()
        if chunks:
            model.index([terms(indexed_text(c)) or [""] for c in chunks], show_progress=False)
            model.save(str(folder), show_progress=False)
        stamp.write_text(json.dumps({"version": self.workspace.version, "chunks": len(chunks)}))
        self._model = model
        return model

    def search(self, query: str, k: int) -> list[Passage]:
        chunks = self.workspace.chunks()
        if not chunks:
            return []
        model = self.ensure_index()
        vocab = model.vocab_dict
        tokens = [t for t in terms(query) if t in vocab]
        if not tokens:
            return []
        import numpy as np

        scores = model.get_scores(tokens)
        top = np.argsort(-scores, kind="stable")[:k]
        return [Passage(chunks[int(i)], float(scores[i]), self.name) for i in top
                if scores[i] > 0 and int(i) < len(chunks)]
