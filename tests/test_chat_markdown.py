"""The chat's live Markdown view (rich's Markdown in a Live), as a terminal shows it: the bytes it
writes are played on a terminal emulator (pyte) and the screen is read back. Streamed in small
pieces, a reply ends up rendered as the whole reply renders (no ** or # left, bullets, a
highlighted code block) and wrapped at word boundaries at the terminal's width."""

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


def rendered(screen):
    return [line.strip() for line in lines(screen) if line.strip()]


@pytest.mark.parametrize("size", [1, 3, 17])
def test_a_streamed_reply_is_rendered(size):
    screen = play(pieces(REPLY, size))
    shown = rendered(screen)
    assert shown == rendered(play([REPLY]))  # streamed in any pieces, it ends as the whole reply renders
    assert shown[0].startswith("Here is bold text and inline code in a")
    assert "**" not in "\n".join(shown) and "`" not in "\n".join(shown)
    assert "Steps" in shown and not any(line.startswith("#") for line in shown)
    bullet = next(i for i, line in enumerate(lines(screen)) if line.strip().startswith("• first item"))
    assert lines(screen)[bullet + 1].startswith("   ")  # the item wraps with a hanging indent
    assert any(line.endswith("a numbered item") and line.startswith("2") for line in shown)
    assert "▌ a quoted remark" in shown
    code = shown.index("def add(a, b):")
    assert shown[code + 1] == "return a + b" and shown[-1] == "Done."
    code_y = next(y for y, line in enumerate(lines(screen)) if "def add" in line)
    assert {screen.buffer[code_y][x].fg for x in range(12)} - {"default"}, "the code is highlighted"
    heading_y = next(y for y, line in enumerate(lines(screen)) if "Steps" in line)
    heading = screen.buffer[heading_y][lines(screen)[heading_y].index("S")]
    assert heading.bold or heading.underscore  # rich styles a heading
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
    screen = play(pieces(long_line, 7) + ["\n\nafter"], columns=30, rows=8)
    rows = [line for line in lines(screen) if line]
    assert rows[-1] == "after"  # the next paragraph starts on a row of its own
    assert " ".join(rows[:-1]).endswith("word197 word198 word199")  # the end of it is all there
