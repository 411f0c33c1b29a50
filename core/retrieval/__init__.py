"""What a retriever is (the contract of the ``register_retrievers`` hook), so a plugin can
provide one without importing the plugin that searches with it (``rag``).

A retriever factory takes a workspace and returns an object with
``search(query: str, k: int) -> list[Passage]`` (best first). The workspace gives
``chunks()`` (the passages), ``version`` (changes when they change) and ``index_dir(name)``
(a folder to keep an index in). ``text.terms`` is the lexical analysis both built-in
retrievers use.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk and its score (higher is better; scales differ between retrievers)."""

    chunk: Any  # a workspace's chunk: path, start, end, text, citation, display_path, section, id
    score: float
    retriever: str = ""

    # the chunk's own fields, read through the passage
    path = property(attrgetter("chunk.path"))
    start = property(attrgetter("chunk.start"))
    end = property(attrgetter("chunk.end"))
    text = property(attrgetter("chunk.text"))
    citation = property(attrgetter("chunk.citation"))

    def to_dict(self) -> dict:
        return {"path": self.chunk.display_path, "abs_path": self.path, "start": self.start, "end": self.end,
                "citation": self.citation, "section": self.chunk.section, "score": round(float(self.score), 4),
                "retriever": self.retriever, "chunk_id": self.chunk.id, "text": self.text}


class Retriever(Protocol):
    def search(self, query: str, k: int) -> list[Passage]: ...



def indexed_text(chunk) -> str:
    """What lexical retrievers index for a chunk: its file name and heading count as words too."""
    name = chunk.path.replace("\\", "/").rsplit("/", 2)
    return " ".join(filter(None, [" ".join(name[-2:]), chunk.section or "", chunk.text]))
