"""A real corpus for the rag tests: the source of the installed `click` package (its code and
docstrings — written by click's authors, not for these tests), copied to a temp folder, and
questions whose answers live in known files of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

CLICK_DIR = Path(click.__file__).resolve().parent

# question -> files (any of them) that answer it. Written from reading click's documentation
# of each feature, not from the retrievers' output.
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("How do I show a progress bar while iterating over items?", ("termui.py", "_termui_impl.py")),
    ("Prompt the user for a password with hidden input and confirmation", ("decorators.py", "termui.py")),
    ("Open the user's text editor to edit a message", ("termui.py", "_termui_impl.py")),
    ("How do I test a command by invoking it with CliRunner and capture its output?", ("testing.py",)),
    ("Shell completion for bash, zsh and fish", ("shell_completion.py",)),
    ("How is help text wrapped and indented into paragraphs?", ("formatting.py",)),
    ("A parameter type that checks a file path exists and is readable", ("types.py",)),
    ("Print text in color with a foreground color and bold style", ("termui.py",)),
    ("Launch a URL or a file in the default application", ("termui.py", "_termui_impl.py")),
    ("What exit code does a UsageError use?", ("exceptions.py",)),
    ("A file that is opened lazily on first access", ("utils.py",)),
    ("Where should an application store its configuration folder on each platform?", ("utils.py",)),
    ("Add a --version option that prints the program version", ("decorators.py",)),
    ("Choice parameter with case insensitive matching", ("types.py",)),
    ("Pass the context object to the callback with a decorator", ("decorators.py",)),
    ("Read default values for options from environment variables with an auto envvar prefix", ("core.py",)),
    ("Group with subcommands and chained command invocation", ("core.py",)),
    ("Windows console streams that read and write UTF-16", ("_winconsole.py",)),
    ("Confirm a yes/no question and abort if the answer is no", ("termui.py", "decorators.py")),
    ("Clear the terminal screen", ("termui.py",)),
    ("Pause and wait for the user to press any key", ("termui.py",)),
    ("Get the current context from inside a command without passing it", ("globals.py",)),
    ("Split command line arguments like a shell does, quoting included", ("parser.py", "shell_completion.py")),
    ("Integer range type with minimum and maximum and clamping", ("types.py",)),
]


def copy_click(dest: Path) -> Path:
    """Copy click's source files (not its bytecode) to ``dest``; returns ``dest``."""
    shutil.copytree(CLICK_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def hit_at_k(results: dict[str, list[str]], k: int) -> float:
    """Share of questions with a right file among the first ``k`` passages' files."""
    hits = 0
    for question, expected in QUESTIONS:
        files = [Path(p).name for p in results[question][:k]]
        hits += any(f in expected for f in files)
    return hits / len(QUESTIONS)


def copy_click_docs(dest: Path) -> Path:
    """A small prose corpus that fits a small model's context: click's README (the long
    description in its installed metadata, Markdown) and its license text."""
    import importlib.metadata

    dist = importlib.metadata.distribution("click")
    dest.mkdir(parents=True, exist_ok=True)
    meta = dist.read_text("METADATA") or ""
    _headers, _, body = meta.partition("\n\n")
    (dest / "README.md").write_text(body.strip() + "\n")
    for file in dist.files or []:
        if file.name.upper().startswith("LICENSE"):
            (dest / "LICENSE.txt").write_text(Path(dist.locate_file(file)).read_text())
            break
    return dest
