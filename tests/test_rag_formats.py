"""Documents as users have them: text in Latin-1, cp1252, UTF-16 (with BOM) and UTF-8 with BOM
is read in its own encoding (not as "Caf� cr�me", not skipped as binary); a Word document
written with python-docx and a PDF are read with their headings, lists and tables; and all of
them end up in a workspace whose passages a question finds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_rag_pdf import minimal_pdf

from superlinear.bus import dispatch
from superlinear.plugins.rag.commands import RagAsk
from superlinear.plugins.rag.files import decode_text, read_lines, skip_reason, walk

FRENCH = ("Le café crème est servi à la terrasse, près de la gare.\n"
          "Très bien, merci : ça coûte trois euros.\n")
TYPOGRAPHY = "He said “hello” — and paid 5 € for the naïve café’s crème brûlée.\n"
GERMAN = "Grüße aus München: die Straße ist schön, über alles.\n"


@pytest.mark.parametrize("text,encoding,expected", [
    (FRENCH, "latin-1", "cp1252"),  # cp1252 is Latin-1 plus typography: the same letters here
    ("Café crème\n", "latin-1", "cp1252"),  # short: charset-normalizer alone guesses cp1250 ("crčme")
    (GERMAN, "latin-1", "cp1252"),
    (TYPOGRAPHY, "cp1252", "cp1252"),
    (FRENCH + GERMAN, "utf-16", "utf-16"),  # Python writes a BOM
    (FRENCH, "utf-8-sig", "utf-8-sig"),
    (FRENCH, "utf-8", "utf-8"),
    ("Привет, как дела? Это тестовый текст на русском языке.\n" * 3, "cp1251", "cp1251"),
])
def test_text_is_decoded_in_its_encoding(text, encoding, expected):
    decoded, found = decode_text(text.encode(encoding))
    assert decoded == text
    assert found == expected
    assert "\ufeff" not in decoded  # a BOM is not text


def test_files_in_other_encodings_are_taken_and_read(tmp_path):
    files = {
        "latin1.txt": FRENCH.encode("latin-1"),
        "cp1252.md": ("# Menu\n\n" + TYPOGRAPHY).encode("cp1252"),
        "utf16.txt": GERMAN.encode("utf-16"),
        "utf8bom.txt": FRENCH.encode("utf-8-sig"),
        "NOTES": GERMAN.encode("latin-1"),  # an unknown extension that is text all the same
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 8)  # NUL bytes: still binary
    found = walk([tmp_path])
    assert sorted(f.path.name for f in found.files) == sorted(files)
    assert found.skipped == {str(tmp_path / "blob"): "binary"}
    assert "\n".join(t for _, t in read_lines(tmp_path / "latin1.txt").lines).startswith("Le café crème")
    lines, kind, encoding = read_lines(tmp_path / "utf16.txt")
    assert lines[0] == (1, GERMAN.strip()) and kind == "text" and encoding == "utf-16"
    assert read_lines(tmp_path / "cp1252.md").lines[2][1] == TYPOGRAPHY.strip()


def test_utf16_without_a_bom_is_still_binary(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_bytes(FRENCH.encode("utf-16-le"))
    assert skip_reason(path) == "binary"


def write_docx(path):
    import docx

    document = docx.Document()
    document.add_heading("Otter care", level=1)
    document.add_paragraph("Feed the otters twice a day, at dawn and at dusk.")
    document.add_heading("Supplies", level=2)
    document.add_paragraph("Fresh fish", style="List Bullet")
    document.add_paragraph("A warm café crème for the keeper", style="List Bullet")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Food", "Amount"
    table.cell(1, 0).text, table.cell(1, 1).text = "Herring", "2 kg"
    document.add_paragraph("Clean the pool on Sundays.")
    document.save(str(path))


def test_a_word_document_is_read_with_its_structure(tmp_path):
    path = tmp_path / "otters.docx"
    write_docx(path)
    assert [f.path for f in walk([tmp_path]).files] == [path]
    lines, kind, _ = read_lines(path)
    assert kind == "docx"
    assert [t for _, t in lines] == [
        "# Otter care", "Feed the otters twice a day, at dawn and at dusk.", "## Supplies", "- Fresh fish",
        "- A warm café crème for the keeper", "Food | Amount", "Herring | 2 kg", "Clean the pool on Sundays."]
    assert [n for n, _ in lines] == list(range(1, 9))


def test_every_format_is_ingested_and_found(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "menu.txt").write_bytes(("Our café crème comes with a croissant.\n").encode("latin-1"))
    (docs / "prices.txt").write_bytes(TYPOGRAPHY.encode("cp1252"))
    (docs / "german.txt").write_bytes(GERMAN.encode("utf-16"))
    write_docx(docs / "otters.docx")
    (docs / "manual.pdf").write_bytes(minimal_pdf(["Install the beaver package first.", "Then build the dam."]))
    env = {**os.environ, "SPL_WORKSPACES_DIR": str(tmp_path / "ws")}

    def spl(*args):
        result = subprocess.run([sys.executable, "-m", "superlinear.cli.main", *args], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    report = json.loads(spl("rag", "ingest", "docs", "-w", "formats", "--no-llm", "--json"))["report"]
    assert len(report["added"]) == 5 and report["skipped"] == {}
    sources = spl("rag", "sources", "formats")
    assert "docs/menu.txt  (text, cp1252," in sources and "docs/german.txt  (text, utf-16," in sources
    assert "docs/otters.docx  (docx," in sources and "docs/manual.pdf  (pdf," in sources
    monkeypatch.setenv("SPL_WORKSPACES_DIR", str(tmp_path / "ws"))
    monkeypatch.chdir(tmp_path)
    for question, where, text in [
        ("café crème croissant", "docs/menu.txt:1", "café crème"),
        ("Straße München", "docs/german.txt:1", "Grüße"),
        ("how often to feed the otters", "docs/otters.docx:", "twice a day"),
        ("install the beaver package", "docs/manual.pdf:", "beaver package"),
    ]:
        passage = dispatch(RagAsk(question, "formats", k=1, llm=False))["passages"][0]
        assert passage["citation"].startswith(where) and text in passage["text"], (question, passage)
