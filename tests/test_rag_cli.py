"""`spl rag …` as a user runs it (subprocesses, no server: --no-llm): output lines, JSON, exit
codes; errors are one line and exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from rag_corpus import copy_click

SPL = [sys.executable, "-m", "superlinear.cli.main"]


@pytest.fixture
def spl(tmp_path):
    env = {**os.environ, "SPL_WORKSPACES_DIR": str(tmp_path / "ws"), "SPL_SERVER_URL": "http://127.0.0.1:9"}

    def run(*args):
        return subprocess.run(SPL + list(args), env=env, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)

    return run


def test_cli_flow(spl, tmp_path):
    copy_click(tmp_path / "click")
    first = spl("rag", "ingest", "click", "-w", "cl", "--no-llm")
    assert first.returncode == 0, first.stderr
    assert re.match(r"workspace cl: \d+ added, 0 updated, 0 unchanged, 0 removed, 0 skipped -> \d+ files, "
                    r"\d+ passages, \d+ chars \(indexed in [\d.]+ s; [\d.]+ s in all\)", first.stdout)
    assert "context: not built (--no-llm)" in first.stdout
    again = spl("rag", "ingest", "-w", "cl", "--no-llm", "--json")
    report = json.loads(again.stdout)["report"]
    assert report["added"] == [] and report["changed"] is False

    ask = spl("rag", "ask", "show a progress bar while iterating", "-w", "cl", "--no-llm", "-k", "2")
    assert ask.returncode == 0, ask.stderr
    assert re.match(r"\[1\] click/termui\.py:\d+-\d+  score \d+\.\d+\n", ask.stdout)
    assert "[2] " in ask.stdout and "[3] " not in ask.stdout

    ls = spl("rag", "ls")
    assert ls.stdout.startswith("cl ") and "retrieval-only" in ls.stdout
    info = spl("rag", "info", "cl")
    assert "root        click" in info.stdout and "context     none" in info.stdout
    sources = spl("rag", "sources", "cl")
    assert "click/core.py" in sources.stdout
    # -w NAME, as ingest and ask take it, works everywhere a workspace is named
    assert spl("rag", "info", "-w", "cl").stdout == info.stdout
    assert spl("rag", "sources", "-w", "cl").stdout == sources.stdout
    both = spl("rag", "info", "cl", "-w", "other")
    assert both.returncode == 2 and "two workspaces given" in both.stderr

    rm = spl("rag", "rm", "-w", "cl")
    assert rm.returncode == 0 and rm.stdout.strip() == "removed workspace cl"
    assert "no workspaces" in spl("rag", "ls").stdout


def test_cli_errors_are_one_line(spl, tmp_path):
    for args, needle in [
        (("rag", "ask", "hello", "-w", "missing", "--no-llm"), "no workspace 'missing'"),
        (("rag", "ingest", "nowhere", "--no-llm"), "no such file or directory"),
        (("rag", "info", "bad/name"), "invalid workspace name"),
        (("rag", "ask", "q", "-k", "0", "--no-llm"), "0"),
        # The LLM path with no server reachable: a clear line, not a traceback.
        (("rag", "ask", "hello", "-w", "missing"), "no workspace"),
    ]:
        result = spl(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, result.stderr)


def test_ask_without_a_reachable_server_says_so(spl, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.md").write_text("otters hold hands while sleeping\n")
    assert spl("rag", "ingest", "d", "-w", "o", "--no-llm").returncode == 0
    result = spl("rag", "ask", "otters", "-w", "o")
    assert result.returncode == 2
    assert "does not answer" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_docs_needs_a_terminal(spl):
    result = subprocess.run(SPL + ["docs", "x"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=60)
    assert result.returncode == 2 and "needs a terminal" in result.stderr


def test_ingest_without_a_server_keeps_the_index(spl, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.md").write_text("beavers build dams\n")
    result = spl("rag", "ingest", "d", "-w", "b")
    assert result.returncode == 0, result.stderr
    assert "context: retrieval-only (context not built: the spl server at http://127.0.0.1:9" in result.stdout
    assert "a.md:1" in spl("rag", "ask", "beavers", "-w", "b", "--no-llm").stdout


def test_a_failed_ingest_leaves_no_new_workspace_and_keeps_an_old_one(spl, tmp_path):
    failed = spl("rag", "ingest", str(tmp_path / "missing"), "-w", "foo", "--no-llm")
    assert failed.returncode == 2 and "no such file or directory" in failed.stderr
    assert not (tmp_path / "ws" / "foo").exists()
    assert "no workspaces" in spl("rag", "ls").stdout

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.md").write_text("beavers build dams\n")
    assert spl("rag", "ingest", "d", "-w", "foo", "--no-llm").returncode == 0
    manifest = (tmp_path / "ws" / "foo" / "manifest.json").read_bytes()
    chunks = (tmp_path / "ws" / "foo" / "chunks.jsonl").read_bytes()
    failed = spl("rag", "ingest", "d", str(tmp_path / "missing"), "-w", "foo", "--no-llm")
    assert failed.returncode == 2 and "no such file or directory" in failed.stderr
    assert (tmp_path / "ws" / "foo" / "manifest.json").read_bytes() == manifest  # untouched
    assert (tmp_path / "ws" / "foo" / "chunks.jsonl").read_bytes() == chunks
    assert "a.md:1" in spl("rag", "ask", "beavers", "-w", "foo", "--no-llm").stdout


def test_the_progress_line_is_cleared_before_the_next_message(monkeypatch, capsys):
    from superlinear.plugins.rag.cli import _Progress

    progress = _Progress(True)
    progress.started -= 5  # a long ingest: the bar shows
    progress(3, 35, "/tmp/stdlib/shutil.py")
    progress.message("prefilling the documents (~900 tokens) into session s1…")
    progress.end()  # nothing more to clear
    err = capsys.readouterr().err
    bar, rest = err.split("3/35 /tmp/stdlib/shutil.py")
    assert bar.startswith("\r\033[Kingest [")
    assert rest == "\r\033[Kprefilling the documents (~900 tokens) into session s1…\n"  # on a line of its own
