"""Finding the documents under the paths a user names, and reading them as numbered lines.

Folders are walked with .gitignore files respected (those of the folder, its subfolders and its
ancestors up to the repository root), hidden and VCS folders skipped, binaries skipped. Each
readable file becomes a list of ``(line number, text)`` so chunks can cite ``path:lines`` of the
original file, HTML included (tags stripped, line numbers kept). Text in any encoding is read:
a BOM (UTF-8/16/32) decides, else UTF-8, else charset-normalizer's guess. PDF (pypdf) and .docx
(python-docx) are read when those optional packages are installed (``pip install 'spl[docs]'``).
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import html
import os
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

TEXT_EXTENSIONS = {
    # prose and markup
    ".txt", ".text", ".md", ".markdown", ".mdx", ".rst", ".adoc", ".asciidoc", ".org", ".tex",
    ".html", ".htm", ".xhtml", ".xml", ".svg", ".json", ".jsonl", ".ndjson", ".csv", ".tsv",
    ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".properties", ".env", ".log", ".1", ".man",
    # code
    ".py", ".pyi", ".pyx", ".ipynb", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".cuh",
    ".rs", ".go", ".java", ".kt", ".kts", ".scala", ".swift", ".m", ".mm", ".js", ".mjs", ".cjs",
    ".ts", ".tsx", ".jsx", ".vue", ".svelte", ".rb", ".php", ".pl", ".pm", ".lua", ".r", ".jl",
    ".sh", ".bash", ".zsh", ".fish", ".ps1", ".bat", ".sql", ".graphql", ".proto", ".cmake",
    ".mk", ".make", ".gradle", ".hs", ".ml", ".mli", ".ex", ".exs", ".erl", ".clj", ".el", ".lisp",
    ".scm", ".dart", ".zig", ".nim", ".v", ".sv", ".vhd", ".css", ".scss", ".sass", ".less",
}
HTML_EXTENSIONS = {".html", ".htm", ".xhtml"}
PDF_EXTENSIONS = {".pdf"}
BINARY_EXTENSIONS = {
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ico", ".webp", ".tif", ".tiff", ".psd", ".mp3", ".mp4",
    ".wav", ".flac", ".ogg", ".avi", ".mov", ".mkv", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst",
    ".7z", ".rar", ".tar", ".whl", ".egg", ".jar", ".so", ".dylib", ".dll", ".exe", ".o", ".a",
    ".lib", ".pyc", ".pyo", ".pyd", ".class", ".bin", ".dat", ".db", ".sqlite", ".npy", ".npz",
    ".pt", ".pth", ".safetensors", ".gguf", ".onnx", ".pkl", ".pickle", ".parquet", ".arrow",
    ".woff", ".woff2", ".ttf", ".otf", ".eot", ".doc", ".xls", ".xlsx", ".ppt", ".pptx",
}
DOCX_EXTENSIONS = {".docx"}
INSTALL_DOCS = "pip install 'spl[docs]'"
# Byte-order marks, longest first (the UTF-32 LE mark starts with the UTF-16 LE one).
BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]
SKIP_DIRS = {"__pycache__", "node_modules", "venv"}  # plus every hidden folder
MAX_FILE_BYTES = 5 * 1024 * 1024


@dataclass
class FoundFile:
    path: Path  # absolute
    root: Path  # the user-named path it was found under


@dataclass
class Walk:
    files: list[FoundFile] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason


def pdf_supported() -> bool:
    return _importable("pypdf")


def docx_supported() -> bool:
    return _importable("docx")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def decode_text(data: bytes) -> tuple[str, str]:
    """``(text, encoding)``: a BOM decides, else UTF-8, else charset-normalizer's best guess."""
    for bom, encoding in BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace"), encoding
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    encoding = guess_encoding(data) or "utf-8"
    return data.decode(encoding, errors="replace"), encoding


def guess_encoding(data: bytes) -> str | None:
    """charset-normalizer's best guess, Western first among equals: on a short text cp1250 and
    cp1252 often tie, and taking cp1250 turns a Latin-1 "café crème" into "café crčme"."""
    import charset_normalizer

    matches = list(charset_normalizer.from_bytes(data))
    if not matches:
        return None
    best = matches[0]
    for match in matches:
        tied = match.chaos <= best.chaos + 0.01 and match.coherence >= best.coherence - 0.01
        if tied and ("cp1252" in match.could_be_from_charset or match.encoding == "cp1252"):
            try:
                data.decode("cp1252")
                return "cp1252"
            except UnicodeDecodeError:  # one of the five bytes cp1252 leaves out
                return "latin-1"
    return best.encoding


def _looks_like_text(head: bytes) -> bool:
    if any(head.startswith(bom) for bom, _ in BOMS):
        return True
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as exc:
        if exc.start >= len(head) - 4:  # just a multibyte character cut at the end of the sample
            return True
    return b"\0" not in head and guess_encoding(head) is not None


class _IgnoreRules:
    """The .gitignore files that apply to one folder, nearest last (git's precedence)."""

    def __init__(self, specs: list[tuple[Path, object]]):
        self.specs = specs

    def child(self, folder: Path) -> _IgnoreRules:
        spec = _read_gitignore(folder)
        return _IgnoreRules(self.specs + [(folder, spec)]) if spec is not None else self

    def ignored(self, path: Path, is_dir: bool) -> bool:
        verdict = False
        for base, spec in self.specs:
            try:
                rel = path.relative_to(base).as_posix()
            except ValueError:
                continue
            if is_dir:
                rel += "/"
            result = spec.check_file(rel)
            if result.include is not None:
                verdict = result.include
        return verdict


def _read_gitignore(folder: Path):
    file = folder / ".gitignore"
    if not file.is_file():
        return None
    import pathspec

    try:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _ancestor_rules(folder: Path) -> _IgnoreRules:
    """Rules from the ancestors of ``folder`` up to the repository root (the folder with .git)."""
    chain = []
    current = folder.parent
    while True:
        chain.append(current)
        if (current / ".git").exists() or current.parent == current:
            break
        current = current.parent
    if not any((c / ".git").exists() for c in chain):
        return _IgnoreRules([])  # not inside a repository: outer .gitignore files do not apply
    rules = _IgnoreRules([])
    for ancestor in reversed(chain):
        rules = rules.child(ancestor)
    return rules


def _matches_globs(path: Path, root: Path, globs: tuple[str, ...]) -> bool:
    """``*.md`` matches by name anywhere; ``docs/**/*.md`` on the path under the folder (git's rules)."""
    if not globs:
        return True
    import pathspec

    rel = path.relative_to(root).as_posix() if path != root else path.name
    if pathspec.GitIgnoreSpec.from_lines(globs).match_file(rel):
        return True
    return any(fnmatch.fnmatch(path.name, g) for g in globs)


def walk(paths: list[Path], globs: tuple[str, ...] = (), max_bytes: int = MAX_FILE_BYTES) -> Walk:
    """Every candidate document under ``paths`` (files named directly are always taken)."""
    result = Walk()
    seen: set[Path] = set()

    def consider(file: Path, root: Path, named: bool) -> None:
        if file in seen:
            return
        seen.add(file)
        reason = skip_reason(file, max_bytes)
        if reason is None and not named and not _matches_globs(file, root, globs):
            return
        if reason:
            result.skipped[str(file)] = reason
            return
        result.files.append(FoundFile(file, root))

    for given in paths:
        root = Path(os.path.abspath(os.path.expanduser(given)))
        if not root.exists():
            raise FileNotFoundError(2, "no such file or directory", str(given))
        if root.is_file():
            consider(root, root.parent, named=True)
            continue
        outer = _ancestor_rules(root)
        if outer.ignored(root, is_dir=True):
            outer = _IgnoreRules([])  # the user named an ignored folder: they want it
        base_rules = outer.child(root)
        stack = [(root, base_rules)]
        while stack:
            folder, rules = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                result.skipped[str(folder)] = f"unreadable ({exc.strerror})"
                continue
            subfolders = []
            for entry in entries:
                path = Path(entry.path)
                if entry.name.startswith("."):
                    continue  # hidden files and VCS folders (.git, .hg, .venv...)
                if entry.is_symlink() and entry.is_dir():
                    continue  # no cycles
                if entry.is_dir():
                    if entry.name in SKIP_DIRS or entry.name.endswith(".egg-info"):
                        continue
                    if not rules.ignored(path, is_dir=True):
                        subfolders.append(path)
                elif entry.is_file() and not rules.ignored(path, is_dir=False):
                    consider(path, root, named=False)
            for sub in reversed(subfolders):
                stack.append((sub, rules.child(sub)))
    return result


def skip_reason(path: Path, max_bytes: int = MAX_FILE_BYTES) -> str | None:
    suffix = path.suffix.lower()
    if suffix in BINARY_EXTENSIONS:
        return "binary"
    if suffix in PDF_EXTENSIONS:
        return None if pdf_supported() else f"pdf (install pypdf to read PDFs: {INSTALL_DOCS})"
    if suffix in DOCX_EXTENSIONS:
        return None if docx_supported() else f"docx (install python-docx to read .docx: {INSTALL_DOCS})"
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if size > max_bytes:
        return f"too large ({size} bytes > {max_bytes})"
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if any(head.startswith(bom) for bom, _ in BOMS):
        return None  # UTF-16/32 text is full of NUL bytes
    if b"\0" in head:
        return "binary"
    if suffix not in TEXT_EXTENSIONS and head and not _looks_like_text(head):
        return "binary"  # unknown extension (README, Makefile, LICENSE... are taken when they read as text)
    return None


def file_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


Lines = list[tuple[int, str]]


class Document(NamedTuple):
    lines: Lines
    kind: str  # text, html, pdf, docx
    encoding: str | None = None  # of a text file


def read_lines(path: Path, data: bytes | None = None) -> Document:
    """The document's text as numbered lines, its kind, and (text files) the encoding it was in."""
    suffix = path.suffix.lower()
    if suffix in PDF_EXTENSIONS:
        return Document(_pdf_lines(path), "pdf")
    if suffix in DOCX_EXTENSIONS:
        return Document(_docx_lines(path), "docx")
    if data is None:
        data = path.read_bytes()
    text, encoding = decode_text(data)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if suffix in HTML_EXTENSIONS:
        return Document(html_lines(text), "html", encoding)
    return Document(list(enumerate(text.split("\n"), start=1)), "text", encoding)


class _HTMLText(HTMLParser):
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header",
             "footer", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dt", "dd", "hr"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: dict[int, list[str]] = {}
        self.skip_depth = 0
        self.title: str | None = None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in self.SKIP:
            self.skip_depth += 1
        if tag in {"h1", "h2", "h3", "h4", "h5", "h6"} and not self.skip_depth:
            self._add(self.getpos()[0], "#" * int(tag[1]) + " ")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in self.SKIP and self.skip_depth:
            self.skip_depth -= 1

    def handle_data(self, data):
        if self._in_title:
            if data.strip():
                self._add(self.getpos()[0], ("" if self.title else "# ") + " ".join(data.split()))
                self.title = (self.title or "") + data
            return
        if self.skip_depth:
            return
        line = self.getpos()[0]
        for offset, piece in enumerate(data.split("\n")):
            self._add(line + offset, piece)

    def _add(self, line: int, text: str) -> None:
        self.lines.setdefault(line, []).append(text)


def html_lines(text: str) -> Lines:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    out: Lines = []
    for number in sorted(parser.lines):
        line = " ".join("".join(parser.lines[number]).split())
        out.append((number, html.unescape(line)))
    return out


def _pdf_lines(path: Path) -> Lines:
    """PDF text; line numbers count the lines of the extracted text, pages marked in the text."""
    import pypdf

    reader = pypdf.PdfReader(str(path))
    out: Lines = []
    number = 0
    for page_no, page in enumerate(reader.pages, start=1):
        number += 1
        out.append((number, f"[page {page_no}]"))
        for line in (page.extract_text() or "").splitlines():
            number += 1
            out.append((number, line))
    return out


def _docx_lines(path: Path) -> Lines:
    """A Word document's paragraphs and tables in order, one line each: headings as Markdown
    ``#`` lines (so passages know their section), list items as ``- …``, table rows as
    ``a | b``. Line numbers count these lines."""
    import docx
    from docx.table import Table

    out: Lines = []
    for block in docx.Document(str(path)).iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                out.append((len(out) + 1, " | ".join(cell.text.strip() for cell in row.cells)))
            continue
        text = block.text
        style = (block.style.name if block.style is not None else "") or ""
        if style == "Title" and text.strip():
            text = "# " + text
        elif style.startswith("Heading ") and style[8:].isdigit() and text.strip():
            text = "#" * min(6, int(style[8:])) + " " + text
        elif style.startswith("List") and text.strip():
            text = "- " + text
        out.append((len(out) + 1, text))
    return out
