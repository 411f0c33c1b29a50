"""The answer checker on crafted answers: invented citations dropped and reported, lists and
ranges handled, code and indexing left alone, loops cut; and the streamed text (fed in pieces of
every size) is exactly the checked whole."""

from __future__ import annotations

import random

import pytest

from superlinear.plugins.rag.answers import AnswerStream, check_answer


def test_valid_citations_are_kept_in_order():
    r = check_answer("Use copytree [2]. It also copies metadata [1].", 5)
    assert r.text == "Use copytree [2]. It also copies metadata [1]."
    assert r.cited == [2, 1] and r.invented == [] and not r.trimmed


def test_invented_numbers_are_dropped_and_reported():
    r = check_answer("Grass is green [6]. The sky is blue [1][7]. See [12, 2].", 5)
    assert r.text == "Grass is green. The sky is blue [1]. See [2]."
    assert r.cited == [1, 2]
    assert r.invented == [6, 7, 12]
    assert "[6], [7], [12]" in r.notes(5)[0] and "[1]-[5]" in r.notes(5)[0]


def test_lists_and_ranges():
    r = check_answer("Both say so [1, 3]; details in [2-4] and [4–9].", 5)
    assert r.cited == [1, 3, 2, 4, 5]
    assert r.invented == [6, 7, 8, 9]
    assert r.text == "Both say so [1, 3]; details in [2-4] and [4, 5]."
    assert check_answer("all of them [1-5]", 3).text == "all of them [1-3]"
    assert check_answer("see [1;2]", 2).cited == [1, 2]


def test_a_listing_of_invented_passages_is_dropped():
    answer = "[1] shutil.py:505-529\n\n[2] shutil.py:552-564\n\n[6] shutil.py:531-550\n\n[13]"
    r = check_answer(answer, 5)
    assert r.text == "[1] shutil.py:505-529\n\n[2] shutil.py:552-564\n\nshutil.py:531-550\n\n"
    assert r.cited == [1, 2] and r.invented == [6, 13]


def test_code_and_indexing_are_not_citations():
    answer = ("Read `sys.argv[1]` or args[0], call f(x)[2].\n\n```python\nitems = [1, 2]\nfirst = items[0]\n```\n"
              "A [link](http://x/[9]) and [3](http://y) are not citations either [1].")
    r = check_answer(answer, 2)
    assert r.text == answer
    assert r.cited == [1] and r.invented == []


def test_no_citation_at_all():
    r = check_answer("Nothing to cite here.", 3)
    assert r.cited == [] and r.invented == [] and r.text == "Nothing to cite here."
    assert r.notes(3) == []


def test_a_loop_is_cut_where_it_starts():
    sentence = "The fill function fills a list of paragraphs with a number of lines."
    answer = f"The wrap function wraps text [1].\n\n{sentence}\n\n{sentence} [2]\n\n{sentence}"
    r = check_answer(answer, 2)
    assert r.text.rstrip() == f"The wrap function wraps text [1].\n\n{sentence}"
    assert r.trimmed and r.cited == [1]  # [2] was in the cut part
    assert "repeating" in r.notes(2)[-1]
    # A loop cut mid-sentence by max_tokens ends the answer too.
    assert check_answer(f"{sentence} {sentence[:40]}", 2).text.rstrip() == sentence


def test_short_repeats_and_repeated_code_are_kept():
    line = "print('a long enough line of code here')"
    answer = f"Yes. Yes.\n```\nx = 1\nx = 1\n{line}\n{line}\n```"
    assert check_answer(answer, 1).text == answer


ANSWERS = [
    "Grass is green [6]. The sky is blue [1][7]. See [12, 2] and [2-4].",
    "[1] shutil.py:505-529\n\n[6] shutil.py:531-550\n\n[13] x",
    "Use `items[1]` and ```py\nx = [1, 2]\n``` then [3] [9] .",
    "Loop: the same sentence comes back again and again. the same sentence comes back again and again [1].",
    "Unclosed `code [9] to the end",
    "trailing group [9]",
    "trailing partial [1, ",
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_the_stream_shows_exactly_the_checked_answer(answer):
    expected = check_answer(answer, 3)
    rng = random.Random(7)
    for trial in range(20):
        stream = AnswerStream(3)
        shown, pos = "", 0
        while pos < len(answer):
            size = 1 if trial == 0 else rng.randint(1, 6)
            shown += stream.feed(answer[pos:pos + size])
            pos += size
        shown += stream.finish()
        assert shown == expected.text, (trial, shown)
        assert stream.result.cited == expected.cited and stream.result.invented == expected.invented


def test_the_stream_never_shows_an_invented_citation():
    stream = AnswerStream(2)
    pieces = ["The answer", " is here", " [", "1", "]", " and", " there", " [", "7", "]", "."]
    seen = [stream.feed(p) for p in pieces] + [stream.finish()]
    assert "7" not in "".join(seen)
    assert "".join(seen) == "The answer is here [1] and there."
    assert seen[2] == ""  # " [" waits until it is known to be a valid citation
