"""Retrieval quality on a real corpus (click's source and docstrings): hit@k of the `bm25` and
`light` retrievers on questions written down in tests/rag_corpus.py.

Run `pytest -q -s tests/test_rag_retrieval.py` to see the numbers.
"""

from __future__ import annotations

import json
import time

import pytest
from rag_corpus import QUESTIONS, copy_click, hit_at_k

from superlinear.bus import dispatch
from superlinear.plugins.rag.commands import RagAsk, RagIngest
from superlinear.plugins.rag.retrieval import BM25Retriever, search
from superlinear.plugins.rag.workspace import Workspace

K = 10


@pytest.fixture(scope="module")
def click_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag-retrieval")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPL_WORKSPACES_DIR", str(root / "workspaces"))
    src = copy_click(root / "click")
    dispatch(RagIngest((str(src),), "click", llm=False))
    yield Workspace.open("click")
    mp.undo()


@pytest.mark.parametrize("retriever", ["bm25", "light"])
def test_hit_at_k(click_workspace, retriever):
    started = time.perf_counter()
    results = {q: [p.path for p in search(click_workspace, q, K, retriever)] for q, _ in QUESTIONS}
    seconds = time.perf_counter() - started
    scores = {k: hit_at_k(results, k) for k in (1, 3, 5)}
    print(f"\n{retriever}: " + ", ".join(f"hit@{k}={v:.2f}" for k, v in scores.items())
          + f" over {len(QUESTIONS)} questions, {len(click_workspace.chunks())} passages, "
          f"{1000 * seconds / len(QUESTIONS):.1f} ms/question")
    assert scores[5] >= 0.85, scores
    assert scores[1] >= 0.6, scores


def test_ask_no_llm_json_shape(click_workspace):
    out = dispatch(RagAsk("Open the user's text editor to edit a message", "click", k=3, llm=False))
    assert out["mode"] == "no-llm" and len(out["passages"]) == 3
    json.dumps(out)  # JSON-ready
    first = out["citations"][0]
    assert first["n"] == 1 and first["path"].endswith((".py",)) and first["start"] <= first["end"]
    assert first["citation"].endswith(f":{first['start']}-{first['end']}") or first["start"] == first["end"]
    scores = [c["score"] for c in out["citations"]]
    assert scores == sorted(scores, reverse=True)


def test_bm25_index_is_kept_on_disk_and_rebuilt_when_passages_change(click_workspace, tmp_path, monkeypatch):
    folder = click_workspace.index_dir("bm25")
    stamp = json.loads((folder / "spl.json").read_text())
    assert stamp["version"] == click_workspace.version
    assert (folder / "vocab.index.json").is_file()
    mtime = (folder / "spl.json").stat().st_mtime_ns
    BM25Retriever(Workspace.open("click")).search("progress bar", 3)  # loads, does not rebuild
    assert (folder / "spl.json").stat().st_mtime_ns == mtime

    monkeypatch.setenv("SPL_WORKSPACES_DIR", str(tmp_path / "ws"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("the first text is about otters\n")
    dispatch(RagIngest((str(tmp_path / "d"),), "small", llm=False))
    assert search(Workspace.open("small"), "otters", 1)[0].path.endswith("a.txt")
    (tmp_path / "d" / "b.txt").write_text("the second text is about beavers\n")
    dispatch(RagIngest((), "small", llm=False))
    assert search(Workspace.open("small"), "beavers", 1)[0].path.endswith("b.txt")
