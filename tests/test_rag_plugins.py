"""Retrievers come from the `register_retrievers` hook: the built-in `bm25` (rag plugin) and
`light` (lightrag plugin), and one from a third-party package added without touching core."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from superlinear.plugins.rag.retrieval import available_retrievers

THIRD_PARTY = '''
"""A third-party retriever: passages whose file name contains a query word come first."""
from superlinear.hookspecs import hookimpl
from superlinear.plugins.rag.retrieval import Passage


class FileNameRetriever:
    def __init__(self, workspace):
        self.workspace = workspace

    def search(self, query, k):
        words = {w.lower() for w in query.split()}
        hits = [c for c in self.workspace.chunks() if any(w in c.path.lower() for w in words)]
        return [Passage(c, 1.0 / (i + 1)) for i, c in enumerate(hits[:k])]


@hookimpl
def register_retrievers(register):
    register("filename", FileNameRetriever)
'''


def test_builtin_retrievers_come_from_two_plugins():
    found = available_retrievers()
    assert found["bm25"][0] == "rag"
    assert found["light"][0] == "lightrag"


def test_third_party_retriever_plugin(tmp_path):
    site = tmp_path / "site"
    (site / "spl_filename").mkdir(parents=True)
    (site / "spl_filename" / "__init__.py").write_text(textwrap.dedent(THIRD_PARTY))
    info = site / "spl_filename-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spl-filename\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[spl]\nfilename = spl_filename\n")
    (info / "RECORD").write_text("")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "alpha.md").write_text("nothing to see\n")
    (docs / "zebra.md").write_text("stripes\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "SPL_WORKSPACES_DIR": str(tmp_path / "ws")}
    spl = [sys.executable, "-m", "superlinear.cli.main"]

    def run(*args):
        return subprocess.run(spl + list(args), env=env, capture_output=True, text=True, timeout=60)

    listed = run("rag", "retrievers")
    assert listed.returncode == 0, listed.stderr
    assert "filename" in listed.stdout and "spl_filename" not in listed.stderr
    assert run("rag", "ingest", str(docs), "-w", "t", "--no-llm").returncode == 0
    asked = run("rag", "ask", "zebra", "-w", "t", "--retriever", "filename", "--no-llm", "--json")
    assert asked.returncode == 0, asked.stderr
    out = json.loads(asked.stdout)
    assert [Path(p["path"]).name for p in out["passages"]] == ["zebra.md"]
    assert out["passages"][0]["retriever"] == "filename"
    # Without the plugin the name is unknown: one line, exit code 2.
    env["SPL_LOAD_PLUGINS"] = ""
    missing = run("rag", "ask", "zebra", "-w", "t", "--retriever", "filename", "--no-llm")
    assert missing.returncode == 2
    assert "unknown retriever 'filename'" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
