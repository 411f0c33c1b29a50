"""The chat's live Markdown view, as a terminal shows it: the bytes it writes are played on a
terminal emulator (pyte) and the screen is read back. Streamed in small pieces, a reply ends up
rendered (no ** or # left, bullets, a highlighted code block between dimmed fences) and
wrapped at word boundaries at the terminal's width."""

from __future__ import annotations

import io

import pytest

pyte = pytest.importorskip("pyte")

from superlinear.plugins.chat.markdown import LiveMarkdown  # noqa: E402

REPLY = """Here is **bold** text and `inline code` in a paragraph that is long enough to wrap at a word boundary.

## Steps
- first item with *emphasis* and enough words to need a second row
2. a numbered item
> a quoted remark

```python
def add(a, b):
    return a + b
```
Done."""


def play(chunks, columns=40, rows=60, kind="markdown"):
    """Feed ``chunks`` to a LiveMarkdown writing to a pyte screen; return the screen."""
    out = io.StringIO()
    live = LiveMarkdown(out, size=lambda: (columns, rows))
    for chunk in chunks:
        live.feed(chunk, kind)
    if not live.at_line_start:
        live.finish_line()
    screen = pyte.Screen(columns, rows)
    pyte.Stream(screen).feed(out.getvalue().replace("\n", "\r\n"))  # the tty's ONLCR
    return screen


def pieces(text, size):
    return [text[i:i + size] for i in range(0, len(text), size)]


def lines(screen):
    return [line.rstrip() for line in screen.display]


@pytest.mark.parametrize("size", [1, 3, 17])
def test_a_streamed_reply_is_rendered(size):
    screen = play(pieces(REPLY, size))
    shown = [line for line in lines(screen) if line]
    assert shown[0].startswith("Here is bold text and inline code in a")
    assert "**" not in "\n".join(shown) and "`inline" not in "\n".join(shown)
    assert "Steps" in shown and not any(line.startswith("#") for line in shown)
    bullet = shown.index(next(line for line in shown if line.startswith("• first item")))
    assert shown[bullet + 1].startswith("  ")  # the item wraps with a hanging indent
    assert "2. a numbered item" in shown and "▌ a quoted remark" in shown
    fence = shown.index("```python")
    assert shown[fence + 1:fence + 4] == ["def add(a, b):", "    return a + b", "```"]
    assert shown[-1] == "Done."
    code_y = lines(screen).index("def add(a, b):")
    assert {screen.buffer[code_y][x].fg for x in range(12)} - {"default"}, "the code is highlighted"
    assert screen.buffer[lines(screen).index("Steps")][0].bold
    assert screen.buffer[0][8].bold and not screen.buffer[0][0].bold  # "bold" is bold, "Here" is not


@pytest.mark.parametrize("columns", [24, 40, 61])
def test_words_are_never_split_across_rows(columns):
    words = ("The superlinear attention of this model searches spans of the context and attends to "
             "the best ones, so a long conversation stays fast while every word of it can still be "
             "found again later").split()
    screen = play(pieces(" ".join(words), 5), columns=columns)
    rows = [line for line in lines(screen) if line]
    assert len(rows) > 1 and all(len(row) <= columns for row in rows)
    assert " ".join(rows).split() == words  # each row holds whole words: nothing was cut mid-word


def test_reasoning_is_dimmed_and_wrapped():
    out = io.StringIO()
    live = LiveMarkdown(out, size=lambda: (30, 20))
    live.feed("let me think about ", "dim")
    live.feed("this question for a while before answering it", "dim")
    live.finish_line()
    assert "\x1b[2m" in out.getvalue()
    screen = play(["let me think about ", "this question for a while before answering it"], columns=30, kind="dim")
    assert [line for line in lines(screen) if line] == ["let me think about this", "question for a while before",
                                                        "answering it"]


def test_a_line_taller_than_the_screen_is_written_as_it_comes():
    long_line = " ".join(f"word{i}" for i in range(200))
    screen = play(pieces(long_line, 7) + ["\nafter"], columns=30, rows=8)
    rows = [line for line in lines(screen) if line]
    assert rows[-1] == "after"  # the next line starts on a row of its own
    assert "".join(rows[:-1]).endswith("word197 word198 word199")  # nothing lost (cut by the terminal)
