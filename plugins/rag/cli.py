"""``spl rag ingest|ask|ls|info|sources|rm|retrievers`` and ``spl docs``: dispatch rag's commands
(or call its plain functions), print.

Every command that works on one workspace takes ``-w NAME``; ``info``, ``sources``, ``rm`` and
``docs`` also take it as an argument (the older form)."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Callable

import click

from superlinear.bus import dispatch
from superlinear.output import emit, emit_json, json_option

from . import commands
from .commands import RagAsk, RagIngest
from .workspace import DEFAULT_WORKSPACE, display_path

WORKSPACE_HELP = "Workspace name (default: $SPL_RAG_WORKSPACE or 'default')."


def _default_workspace() -> str:
    return os.environ.get("SPL_RAG_WORKSPACE") or DEFAULT_WORKSPACE


def workspace_option(func):
    return click.option("--workspace", "-w", default=None, metavar="NAME", help=WORKSPACE_HELP)(func)


def _one_workspace(name: str | None, workspace: str | None) -> str:
    """The workspace named by ``-w NAME`` (as every rag command takes it) or, the older form, by
    the NAME argument; the default one when neither is given."""
    if name and workspace and name != workspace:
        raise click.UsageError(f"two workspaces given ({name!r} and -w {workspace!r}); name one")
    return workspace or name or _default_workspace()


class _Progress:
    """A one-line progress on stderr for long ingests (only on a terminal, only past 1 s)."""

    def __init__(self, enabled: bool):
        import time

        self.enabled = enabled
        self.started = time.monotonic()
        self._clock = time.monotonic
        self.shown = False

    def __call__(self, done: int, total: int, path: str) -> None:
        if not self.enabled or (not self.shown and self._clock() - self.started < 1.0 and done < total):
            return
        width = 24
        filled = int(width * done / max(total, 1))
        name = display_path(path)
        name = name if len(name) <= 40 else "…" + name[-39:]
        sys.stderr.write(f"\r\033[Kingest [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name}")
        sys.stderr.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False

    def message(self, line: str) -> None:
        """A line of its own: the progress bar is cleared first, so the two never run together."""
        self.end()
        click.echo(line, err=True)


@click.group("rag")
def rag_group() -> None:
    """Questions over your own files: ingest them into a workspace, then ask.

    The documents are prefilled once into a workspace session on the server and snapshotted;
    each question loads that snapshot (no re-prefill) and is answered with numbered citations
    [n] mapped to path:lines. Documents too large for the context are answered from the
    retrieved passages alone.
    """


@rag_group.command("ingest")
@click.argument("paths", nargs=-1, type=click.Path())
@workspace_option
@click.option("--glob", "globs", multiple=True, metavar="PATTERN",
              help="Only files matching this pattern (repeatable), e.g. --glob '*.md'.")
@click.option("--chunk-chars", type=click.IntRange(100), default=None,
              help="Characters per passage (default 1200, about 300 tokens).")
@click.option("--overlap", type=click.IntRange(0), default=None, help="Characters repeated between passages (150).")
@click.option("--no-llm", is_flag=True, help="Index only: do not build the context snapshot on the server.")
@click.option("--max-seq-len", type=click.IntRange(256), default=None,
              help="Length of the workspace session (default: the server's).")
@click.option("--rebuild", is_flag=True, help="Rebuild the context snapshot even if nothing changed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ingest_command(paths, workspace, globs, chunk_chars, overlap, no_llm, max_seq_len, rebuild, as_json):
    """Add files and folders to a workspace (again: sync changes).

    Folders are walked respecting .gitignore, skipping hidden folders and binaries. Text, Markdown,
    reStructuredText, code, HTML, JSON, CSV in any encoding (and PDF and .docx with
    `pip install 'spl[docs]'`). With no PATH,
    re-sync the workspace's folders: unchanged files are skipped, changed ones re-read, deleted
    ones dropped.
    """
    from superlinear.client.progress import PrefillBar

    progress = _Progress(sys.stderr.isatty() and not as_json)
    # the status line before the prefill carries the time estimate: the bar adds none of its own
    bar = PrefillBar(label="prefill", note=lambda line: None, enabled=sys.stderr.isatty() and not as_json)
    started = time.perf_counter()
    try:
        result = dispatch(RagIngest(tuple(paths), workspace or _default_workspace(), tuple(globs), chunk_chars,
                                    overlap, llm=not no_llm, max_seq_len=max_seq_len, rebuild=rebuild,
                                    progress=progress, status=None if as_json else progress.message,
                                    prefill=bar.update))
    finally:
        bar.close()
        progress.end()
    wall = time.perf_counter() - started
    if emit_json(result, as_json):
        return
    r = result["report"]
    click.echo(f"workspace {r['workspace']}: {len(r['added'])} added, {len(r['updated'])} updated, "
               f"{r['unchanged']} unchanged, {len(r['removed'])} removed, {len(r['skipped'])} skipped "
               f"-> {r['files']} files, {r['chunks']} passages, {r['chars']} chars (indexed in {r['seconds']:.2f} s; "
               f"{wall:.2f} s in all)")
    for path, reason in list(r["skipped"].items())[:10]:
        click.echo(f"  skipped {display_path(path)}: {reason}", err=True)
    if len(r["skipped"]) > 10:
        click.echo(f"  … and {len(r['skipped']) - 10} more skipped", err=True)
    click.echo(_context_line(result.get("context") or {}))


def _context_line(c: dict) -> str:
    mode = c.get("mode")
    if mode == "context" or c.get("snapshot_id"):
        reused = " (unchanged, reused)" if c.get("reused") else ""
        stale = "" if c.get("current", True) else " (stale: documents changed; ingest without --no-llm)"
        time_part = f", prefill {c['prefill_s']:.2f} s" if c.get("prefill_s") is not None else ""
        return (f"context: {c.get('tokens')} tokens in snapshot {c.get('snapshot_id')}"
                f"{time_part}, session length {c.get('max_seq_len')}{reused}{stale}")
    if mode == "skipped":
        return "context: not built (--no-llm): questions are answered from retrieved passages"
    return f"context: retrieval-only ({c.get('reason', 'no context')})"


@rag_group.command("ask")
@click.argument("question")
@workspace_option
@click.option("-k", "--k", "k", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Passages to retrieve.")
@click.option("--retriever", "-r", default="bm25", show_default=True, help="bm25, light, or a plugin's.")
@click.option("--no-llm", is_flag=True, help="Print the retrieved passages only.")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True, help="Cap on the answer.")
@click.option("--json", "as_json", is_flag=True, help="Answer, citations and scores as JSON.")
def ask_command(question, workspace, k, retriever, no_llm, max_tokens, as_json):
    """Ask a question about a workspace's documents."""
    if question == "-":
        question = sys.stdin.read()
    streamed = []

    def on_text(delta: str) -> None:
        streamed.append(delta)
        click.echo(delta, nl=False)
        sys.stdout.flush()

    result = dispatch(RagAsk(question, workspace or _default_workspace(), k, retriever, llm=not no_llm,
                             max_tokens=max_tokens, on_text=None if as_json or no_llm else on_text))
    if emit_json(result, as_json):
        return
    if no_llm:
        if not result["passages"]:
            click.echo("no passage matches the question")
        for i, p in enumerate(result["passages"], start=1):
            click.echo(f"[{i}] {p['citation']}  score {p['score']:.3f}")
            click.echo(textwrap.indent(_snippet(p["text"]), "    "))
        return
    if streamed:
        click.echo("")
    else:
        click.echo(result["answer"] or "(no answer)")
    for line in ([result["note"]] if result.get("note") else []) + result.get("answer_notes", []):
        click.echo(f"note: {line}", err=True)
    if result["citations"]:
        click.echo("")
        click.echo("Sources (* = cited by the answer):" if result["cited"] else
                   "Sources (the answer cites none of them):")
        for c in result["citations"]:
            mark = "*" if c.get("cited") else " "
            click.echo(f" {mark}[{c['n']}] {c['citation']}  (score {c['score']:.3f})")
    click.echo(f"({result['mode']}, {result['retriever']}, {result.get('seconds', 0):.2f} s)", err=True)


def _snippet(text: str, width: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@rag_group.command("ls")
@json_option
def ls_command(as_json):
    """List workspaces."""
    result = commands.list_workspaces()
    if emit_json(result, as_json):
        return
    if not result["workspaces"]:
        click.echo("no workspaces (create one with `spl rag ingest PATH`)")
    for w in result["workspaces"]:
        if w.get("error"):
            click.echo(f"{w['name']:<20} {w['error']} (remove it with `spl rag rm {w['name']}`)")
            continue
        snap = (w.get("context") or {}).get("snapshot_id") or "-"
        click.echo(f"{w['name']:<20} {w['files']:>6} files {w['chunks']:>7} passages  {w['mode']:<14} "
                   f"snapshot {snap}  updated {w['updated']}")


def _workspace_command(command_name: str, read: Callable[[str], dict], show: Callable[[dict], None],
                       help: str) -> click.Command:
    """``spl rag COMMAND [NAME]``: what ``read`` reports of one workspace, printed by ``show`` (or
    as one JSON document)."""

    @rag_group.command(command_name, help=help)
    @click.argument("name", required=False)
    @workspace_option
    @json_option
    def command(name, workspace, as_json):
        result = read(_one_workspace(name, workspace))
        if not emit_json(result, as_json):
            show(result)

    return command


def _show_info(result: dict) -> None:
    click.echo(f"workspace   {result['name']}  ({result['path']})")
    for root in result["roots"]:
        globs = f"  (globs: {', '.join(root['globs'])})" if root.get("globs") else ""
        click.echo(f"root        {display_path(root['path'])}{globs}")
    click.echo(f"documents   {result['files']} files, {result['chunks']} passages, {result['chars']} chars")
    ch = result.get("chunking") or {}
    click.echo(f"chunking    {ch.get('max_chars')} chars, overlap {ch.get('overlap')}")
    c = result.get("context")
    if c:
        state = "current" if result["context_current"] else "stale (documents changed)"
        click.echo(f"context     snapshot {c.get('snapshot_id')}, {c.get('tokens')} tokens of "
                   f"{c.get('max_seq_len')}, prefill {c.get('prefill_s')} s, {state}")
    else:
        click.echo("context     none: answers come from retrieved passages alone")
        if result.get("retrieval_only_reason"):
            click.echo(f"            ({result['retrieval_only_reason']})")
    click.echo(f"updated     {result['updated']}")


info_command = _workspace_command("info", commands.workspace_info, _show_info,
                                  "Show a workspace: roots, files, passages, context snapshot.")


@rag_group.command("rm")
@click.argument("names", nargs=-1)
@click.option("--workspace", "-w", "workspaces", multiple=True, metavar="NAME",
              help="Workspace to remove (repeatable; or give the names as arguments).")
@click.option("--keep-snapshot", is_flag=True, help="Keep the workspace's context snapshot on the server.")
@json_option
def rm_command(names, workspaces, keep_snapshot, as_json):
    """Remove workspaces (and their context snapshots)."""
    names = list(dict.fromkeys([*names, *workspaces]))
    if not names:
        raise click.UsageError("name the workspaces to remove: spl rag rm -w NAME (or spl rag rm NAME)")
    results = []
    for name in names:
        result = commands.remove_workspace(name, keep_snapshot)
        results.append(result)
        if as_json:
            continue
        extra = ""
        if result.get("snapshot_removed"):
            extra = f" and snapshot {result['snapshot_id']}"
        elif result.get("snapshot_error"):
            extra = f" (snapshot {result['snapshot_id']} not removed: {result['snapshot_error']})"
        click.echo(f"removed workspace {result['removed']}{extra}")
    emit_json(results, as_json)


def _show_sources(result: dict) -> None:
    for f in result["files"]:
        encoding = f", {f['encoding']}" if f.get("encoding") not in (None, "utf-8") else ""
        click.echo(f"{f['path']}  ({f.get('kind')}{encoding}, {f.get('lines')} lines, {f.get('chunks')} passages)")


sources_command = _workspace_command("sources", commands.sources, _show_sources, "List the files of a workspace.")


@rag_group.command("retrievers")
@json_option
def retrievers_command(as_json):
    """List the retrievers plugins provide."""
    emit(commands.retrievers(), as_json, lambda result: "\n".join(
        f"{r['name']:<12} {r['plugin']}{'  (default)' if r['default'] else ''}" for r in result["retrievers"]))


@click.command("docs")
@click.argument("name", required=False)
@workspace_option
@click.option("--url", default=None, help="Server to talk to (default: the configured one, or a local one).")
@click.option("-k", "--k", "k", type=click.IntRange(1, 50), default=5, show_default=True,
              help="Passages retrieved for each question.")
@click.option("--retriever", "-r", default="bm25", show_default=True, help="bm25, light, or a plugin's.")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="Cap on tokens per reply.")
@click.option("--temp", "temperature", type=click.FloatRange(0.0, 2.0), default=None, help="Temperature.")
def docs_command(name, workspace, url, k, retriever, max_tokens, temperature):
    """Chat over a workspace's documents (the `spl chat` REPL in the workspace session).

    Extra commands: /add PATH…, /sources, /rag k N | retriever NAME | off | on, /reset.
    """
    from .docs import run_docs

    if not sys.stdin.isatty():
        raise click.UsageError("spl docs needs a terminal; use `spl rag ask` for scripts")
    return run_docs(_one_workspace(name, workspace), url=url, k=k, retriever=retriever, max_tokens=max_tokens,
                    temperature=temperature)
