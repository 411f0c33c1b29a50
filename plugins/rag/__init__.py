"""Built-in plugin ``rag``: questions over your own files.

``spl rag ingest|ask|ls|info|rm|sources|retrievers``, ``spl docs NAME`` (the chat REPL in a
workspace session, with /add, /sources, /rag, /reset) and the ``bm25`` retriever. The ``light``
retriever is the separate ``lightrag`` plugin; any plugin can add one (docs/rag.md).

Modules: ``files`` (walk + read), ``chunking``, ``text`` (terms), ``workspace`` (on-disk
workspace, ingest sync), ``retrieval`` (Passage, retriever registry, bm25), ``llm`` (context
snapshot, answers with citations), ``commands`` (its bus commands, ingest and ask), ``cli``, ``docs`` (REPL).
Nothing heavy is imported here: bm25s, httpx and prompt_toolkit load when used.
"""

from __future__ import annotations

from superlinear.hookspecs import hookimpl


@hookimpl
def register_commands(register):
    from superlinear.client.url_option import with_url_option

    from .cli import ask_command, docs_command, ingest_command, rag_group, rm_command

    for command in (ingest_command, ask_command, rm_command):  # those that talk to a server
        with_url_option(command)
    register(rag_group)
    register(docs_command)


@hookimpl
def register_handlers(register):
    from .commands import HANDLERS

    for command_type, handler in HANDLERS:
        register(command_type, handler)


@hookimpl
def register_retrievers(register):
    from .retrieval import BM25Retriever

    register("bm25", BM25Retriever)
