"""End to end with the real server and the default model: `spl rag ingest` prefills a small real
corpus (click's license and the start of its README) into a workspace session and snapshots it;
`spl rag ask` answers from that snapshot (the documents' tokens are reused, not prefilled again)
and cites path:lines. The shared server of the run (conftest's ``server``); the workspaces, the
client's state and the documents go to this module's temp folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rag_corpus import copy_click_docs

pytestmark = pytest.mark.slow

SPL = [sys.executable, "-m", "superlinear.cli.main"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rag-e2e")


def _env(server, root: Path, **extra) -> dict:
    return {**server.env, "SPL_WORKSPACES_DIR": str(root / "ws"), "SPL_STATE_DIR": str(root / "cli-state"), **extra}


def _spl(server, root, *args, timeout=300):
    return subprocess.run(SPL + list(args), env=_env(server, root), capture_output=True, text=True, timeout=timeout,
                          cwd=root)


@pytest.fixture(scope="module")
def ingested(server, root):
    docs = copy_click_docs(root / "docs")
    readme = docs / "README.md"
    # Keep the corpus small: the CPU prefill of the default model is the slow part.
    readme.write_text("\n".join(readme.read_text().splitlines()[:16]) + "\n")
    # Short passages keep each question's prefill small too.
    ingest = _spl(server, root, "rag", "ingest", str(docs), "-w", "click", "--chunk-chars", "400", "--overlap", "40",
                  "--json")
    assert ingest.returncode == 0, ingest.stderr
    return json.loads(ingest.stdout)["context"]


def test_ingest_snapshot_then_ask_cites_a_path(server, root, ingested):
    context = ingested
    assert context["mode"] == "context", context
    assert context["snapshot_id"] and context["tokens"] > 200
    assert (server.tmp / "snapshots" / context["snapshot_id"]).is_dir()
    print(f"\ningest: {context['tokens']} tokens prefilled in {context['prefill_s']} s, "
          f"snapshot {context['snapshot_id']}")

    ask = _spl(server, root, "rag", "ask", "Who holds the copyright of the software?", "-w", "click", "-k", "1",
               "--max-tokens", "12", "--json")
    assert ask.returncode == 0, ask.stderr
    out = json.loads(ask.stdout)
    assert out["mode"] == "context" and out["snapshot_id"] == context["snapshot_id"]
    assert out["answer"].strip()
    assert out["citations"][0]["citation"].startswith("docs/LICENSE.txt:")
    # The documents came back from the snapshot: their tokens were reused, not prefilled again.
    cached = out["usage"]["cached_tokens"]  # the API's usage (superlinear.api Done.usage)
    assert cached >= context["tokens"], out["usage"]
    print(f"ask: {out['seconds']} s, {cached} tokens reused, answer {out['answer']!r}")

    # The text form streams the answer, then lists the sources with path:lines.
    text = _spl(server, root, "rag", "ask", "What is Click?", "-w", "click", "-k", "1", "--max-tokens", "8")
    assert text.returncode == 0, text.stderr
    assert re.search(r"\nSources \(.*\):\n [ *]\[1\] docs/README\.md:\d+-\d+  \(score \d", text.stdout), text.stdout
    assert "(context, bm25," in text.stderr

    info = _spl(server, root, "rag", "info", "click")
    assert info.returncode == 0 and context["snapshot_id"] in info.stdout and "current" in info.stdout


CITATION = re.compile(r"(?<![\w)\]`/])\[\s*(\d+(?:\s*[,;\-–]\s*\d+)*)\s*\]")


def cited_in(text: str) -> set[int]:
    """Every passage number the text cites, read independently of the checker (code left out)."""
    prose = re.sub(r"```.*?(```|$)|`[^`]*`", " ", text, flags=re.S)
    numbers = set()
    for group in CITATION.findall(prose):
        for item in re.split(r"\s*[,;]\s*", group):
            low, _, high = item.partition("-")
            numbers.update(range(int(low), int(high or low) + 1))
    return numbers


def test_every_citation_in_an_answer_refers_to_a_passage_that_was_given(server, root, ingested):
    k = 2
    for question in ("Who holds the copyright of the software?",
                     "Under which conditions may the software be redistributed?"):
        ask = _spl(server, root, "rag", "ask", question, "-w", "click", "-k", str(k), "--max-tokens", "32", "--json")
        assert ask.returncode == 0, ask.stderr
        out = json.loads(ask.stdout)
        assert len(out["citations"]) == k
        given = set(range(1, k + 1))
        assert cited_in(out["answer"]) <= given, out
        assert set(out["cited"]) == cited_in(out["answer"]), out
        assert not set(out["invented_citations"]) & given
        if out["invented_citations"]:  # what the model made up is reported, and was in its raw text
            assert set(out["invented_citations"]) <= cited_in(out["raw_answer"])
        print(f"\n{question!r}: {out['answer']!r} cited {out['cited']} invented {out['invented_citations']}")
    # The streamed text form shows the checked answer too, and marks what it cites.
    text = _spl(server, root, "rag", "ask", "Who holds the copyright?", "-w", "click", "-k", str(k),
                "--max-tokens", "24")
    assert text.returncode == 0, text.stderr
    answer = text.stdout.split("\nSources")[0]
    assert cited_in(answer) <= given, text.stdout
    assert re.search(r"\nSources \((\* = cited by the answer|the answer cites none of them)\):\n", text.stdout)


def test_docs_repl_in_a_terminal(server, root, ingested):
    pexpect = pytest.importorskip("pexpect")
    env = _env(server, root, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="160", LINES="40")
    child = pexpect.spawn(sys.executable, ["-m", "superlinear.cli.main", "docs", "click", "--url", server.url,
                                           "--max-tokens", "6", "--temp", "0"],
                          env=env, encoding="utf-8", timeout=60, dimensions=(40, 160), cwd=str(root))
    child.logfile_read = open(root / "docs-pty.log", "a")
    try:
        child.expect(r"docs click: 2 files")
        child.expect(rf"session docs-click reset to snapshot {ingested['snapshot_id']}")
        child.send("/sources\r")
        child.expect(r"docs/LICENSE\.txt")
        child.send("/rag k 2\r")
        child.expect(r"retrieval on: k=2, retriever=bm25")
        child.send("Who holds the copyright?\r")
        child.expect(r"(\d+) reused")  # the turn's footer: the answer came back
        assert int(child.match.group(1)) >= ingested["tokens"]  # on top of the documents' tokens
        child.send("/tail 2\r")
        child.expect(r"\[1\] \(docs/LICENSE\.txt:\d+-\d+\)")  # the question went with its passages
        child.send("/reset\r")
        child.expect(r"reset to snapshot")
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    with server.http() as http:
        messages = http.get("/v1/sessions/docs-click/history").json()["messages"]
    assert [m["role"] for m in messages] == ["system"]


def test_rm_removes_workspace_and_snapshot(server, root, ingested):
    rm = _spl(server, root, "rag", "rm", "click")
    assert rm.returncode == 0 and ingested["snapshot_id"] in rm.stdout
    assert not (server.tmp / "snapshots" / ingested["snapshot_id"]).exists()
    assert not (root / "ws" / "click").exists()
