"""PDF is optional: read with pypdf when it is installed, skipped with a clear reason when not."""

from __future__ import annotations

import pytest

from superlinear.plugins.rag.files import pdf_supported, read_lines, walk


def minimal_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page (objects + xref written by hand)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        content = len(objects)
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                       f"/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_pdf_is_read_or_skipped(tmp_path):
    pdf = tmp_path / "manual.pdf"
    pdf.write_bytes(minimal_pdf(["Install the otter package first.", "Then feed the otters twice a day."]))
    found = walk([tmp_path])
    if not pdf_supported():
        assert found.files == []
        assert "install pypdf" in found.skipped[str(pdf)]
        pytest.skip("pypdf is not installed (optional): PDFs are skipped with that reason")
    assert [f.path for f in found.files] == [pdf]
    lines, kind, _encoding = read_lines(pdf)
    text = "\n".join(t for _, t in lines)
    assert kind == "pdf" and "[page 1]" in text and "[page 2]" in text
    assert "Install the otter package first." in text and "feed the otters" in text
