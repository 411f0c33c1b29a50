"""rag ingest: walking folders (.gitignore, hidden, binaries), reading formats, chunks that keep
their line ranges, and re-ingest sync (unchanged / updated / added / removed) on a real corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from rag_corpus import copy_click

from superlinear.bus import dispatch
from superlinear.errors import InvalidRequest, NotFound, UserError
from superlinear.plugins.rag import commands
from superlinear.plugins.rag.chunking import chunk_lines
from superlinear.plugins.rag.commands import RagAsk, RagIngest
from superlinear.plugins.rag.files import html_lines, read_lines, walk
from superlinear.plugins.rag.workspace import Workspace


@pytest.fixture(autouse=True)
def _workspaces(tmp_path, monkeypatch):
    monkeypatch.setenv("SPL_WORKSPACES_DIR", str(tmp_path / "workspaces"))


def test_walk_respects_gitignore_hidden_dirs_and_binaries(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".gitignore").write_text("build/\n*.log\n!keep.log\n")
    (repo / "docs").mkdir()
    (repo / "docs" / ".gitignore").write_text("draft-*.md\n")
    (repo / "docs" / "guide.md").write_text("# Guide\ntext\n")
    (repo / "docs" / "draft-1.md").write_text("draft\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.txt").write_text("generated\n")
    (repo / "run.log").write_text("log\n")
    (repo / "keep.log").write_text("kept\n")
    (repo / ".hidden").mkdir()
    (repo / ".hidden" / "secret.md").write_text("hidden\n")
    (repo / "__pycache__").mkdir()
    (repo / "__pycache__" / "x.txt").write_text("cache\n")
    (repo / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (repo / "blob.dat2").write_bytes(b"abc\0def")
    (repo / "Makefile").write_text("all:\n\techo hi\n")
    (repo / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))

    found = {f.path.relative_to(repo).as_posix() for f in walk([repo]).files}
    assert found == {"docs/guide.md", "keep.log", "Makefile", "latin1.txt"}
    skipped = walk([repo]).skipped
    assert skipped[str(repo / "image.png")] == "binary"
    assert skipped[str(repo / "blob.dat2")] == "binary"
    # A subfolder named directly still sees the repository's .gitignore files.
    assert {f.path.name for f in walk([repo / "docs"]).files} == {"guide.md"}
    # Globs filter the walk; a file named directly is always taken.
    assert {f.path.name for f in walk([repo], ("*.md",)).files} == {"guide.md"}
    assert {f.path.name for f in walk([repo], ("docs/**/*.md", "Makefile")).files} == {"guide.md", "Makefile"}
    assert walk([repo], ("src/*.md",)).files == []
    # An ignored folder named directly is walked (its own rules still apply).
    assert [f.path.name for f in walk([repo / "build"]).files] == ["out.txt"]
    assert [f.path.name for f in walk([repo / "docs" / "draft-1.md"]).files] == ["draft-1.md"]


def test_html_is_stripped_and_keeps_source_line_numbers():
    page = ("<html><head><title>Manual</title><style>p {color: red}</style></head>\n"
            "<body>\n<h1>Install</h1>\n<p>Run <code>make</code> &amp; wait.</p>\n"
            "<script>var x = 1;</script>\n<p>Second\nparagraph</p></body></html>\n")
    lines = dict(html_lines(page))
    assert lines[1] == "# Manual"
    assert lines[3] == "# Install"
    assert lines[4] == "Run make & wait."
    assert lines[6] == "Second" and lines[7] == "paragraph"
    assert not any("color" in t or "var x" in t for t in lines.values())


def test_chunks_keep_exact_line_ranges_on_real_files(tmp_path):
    src = copy_click(tmp_path / "click")
    for file in sorted(src.glob("*.py")):
        lines, kind, _encoding = read_lines(file)
        raw = file.read_text().split("\n")
        pieces = chunk_lines(lines, max_chars=800, overlap=100)
        assert pieces or not file.read_text().strip()
        covered = set()
        for piece in pieces:
            body = piece.text.split("\n")
            assert len(piece.text) <= 800 + 1
            # First and last line of the passage are the file's lines at start and end.
            assert raw[piece.start - 1].rstrip().startswith(body[0]), (file.name, piece.start)
            assert raw[piece.end - 1].rstrip().endswith(body[-1]), (file.name, piece.end)
            covered.update(range(piece.start, piece.end + 1))
        nonblank = {i + 1 for i, line in enumerate(raw) if line.strip()}
        assert nonblank <= covered, f"{file.name}: lines not in any passage"


def test_markdown_and_rst_sections_are_recorded():
    md = [(1, "# Title"), (2, "intro"), (3, ""), (4, "## Usage"), (5, "run it")]
    pieces = chunk_lines(md, max_chars=100, overlap=0)
    assert pieces[0].section == "Title"
    rst = [(1, "Install"), (2, "======="), (3, ""), (4, "pip install x")]
    assert chunk_lines(rst)[0].section == "Install"


def test_reingest_skips_unchanged_updates_changed_drops_deleted(tmp_path):
    src = copy_click(tmp_path / "click")
    n_files = len([p for p in src.rglob("*") if p.is_file()])
    first = dispatch(RagIngest((str(src),), "click", llm=False))["report"]
    assert len(first["added"]) == n_files and first["unchanged"] == 0 and first["chunks"] > 100

    again = dispatch(RagIngest((str(src),), "click", llm=False))["report"]
    assert (again["added"], again["updated"], again["removed"]) == ([], [], [])
    assert again["unchanged"] == n_files and again["chunks"] == first["chunks"]

    # Edit one file, delete one, add one: re-sync with no PATH uses the recorded root.
    with open(src / "termui.py", "a") as fh:
        fh.write("\n# The flamingo quorum rule: every prompt waits for three pink birds.\n")
    (src / "globals.py").unlink()
    (src / "CHANGES.md").write_text("# Changes\n\nVersion 99 adds the walrus parameter to every command.\n")
    third = dispatch(RagIngest((), "click", llm=False))["report"]
    assert [Path(p).name for p in third["updated"]] == ["termui.py"]
    assert [Path(p).name for p in third["removed"]] == ["globals.py"]
    assert [Path(p).name for p in third["added"]] == ["CHANGES.md"]
    assert third["unchanged"] == n_files - 2
    assert third["files"] == n_files

    ws = Workspace.open("click")
    assert not any(c.path.endswith("globals.py") for c in ws.chunks())
    hit = dispatch(RagAsk("flamingo quorum pink birds", "click", k=1, llm=False))
    assert hit["passages"][0]["abs_path"] == str(src / "termui.py")
    assert "flamingo" in hit["passages"][0]["text"]
    new = dispatch(RagAsk("walrus parameter version 99", "click", k=1, llm=False, retriever="light"))
    assert new["citations"][0]["abs_path"] == str(src / "CHANGES.md")
    assert new["citations"][0]["citation"].endswith("CHANGES.md:1-3")

    # Deleting the whole root drops its files.
    import shutil

    shutil.rmtree(src)
    gone = dispatch(RagIngest((), "click", llm=False))["report"]
    assert len(gone["removed"]) == n_files and gone["files"] == 0


def test_second_root_is_kept_when_first_is_reingested(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "one.txt").write_text("apples are red\n")
    (b / "two.txt").write_text("bananas are yellow\n")
    dispatch(RagIngest((str(a),), "two", llm=False))
    dispatch(RagIngest((str(b),), "two", llm=False))
    (a / "one.txt").unlink()
    report = dispatch(RagIngest((str(a),), "two", llm=False))["report"]
    assert [Path(p).name for p in report["removed"]] == ["one.txt"]
    assert report["files"] == 1
    info = commands.workspace_info("two")
    assert {Path(r["path"]).name for r in info["roots"]} == {"a", "b"}


def test_workspace_commands_and_errors(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.md").write_text("hello world\n")
    dispatch(RagIngest((str(tmp_path / "d"),), "w1", llm=False))
    names = [w["name"] for w in commands.list_workspaces()["workspaces"]]
    assert names == ["w1"]
    with pytest.raises(NotFound):
        dispatch(RagAsk("hello", "nope", llm=False))
    with pytest.raises(InvalidRequest):
        dispatch(RagIngest((str(tmp_path / "d"),), "../escape", llm=False))
    with pytest.raises(InvalidRequest):
        dispatch(RagAsk("hello", "w1", retriever="nope", llm=False))
    with pytest.raises(InvalidRequest):
        dispatch(RagAsk("   ", "w1", llm=False))
    with pytest.raises(UserError):
        dispatch(RagIngest((str(tmp_path / "missing"),), "w1", llm=False))
    with pytest.raises(NotFound):
        dispatch(RagIngest((), "never-made", llm=False))
    assert dispatch(RagAsk("zzzqqq", "w1", llm=False))["passages"] == []
    removed = commands.remove_workspace("w1")
    assert removed["removed"] == "w1" and removed["snapshot_id"] is None
    assert commands.list_workspaces()["workspaces"] == []


def test_damaged_manifest_is_a_clear_error_and_can_be_removed(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.md").write_text("hello\n")
    dispatch(RagIngest((str(tmp_path / "d"),), "ok", llm=False))
    dispatch(RagIngest((str(tmp_path / "d"),), "bad", llm=False))
    (Workspace("bad").path / "manifest.json").write_text("{not json")
    listed = {w["name"]: w for w in commands.list_workspaces()["workspaces"]}
    assert listed["ok"]["files"] == 1 and "unreadable manifest" in listed["bad"]["error"]
    with pytest.raises(UserError, match="damaged manifest"):
        dispatch(RagAsk("hello", "bad", llm=False))
    assert commands.remove_workspace("bad")["removed"] == "bad"
    assert [w["name"] for w in commands.list_workspaces()["workspaces"]] == ["ok"]
