"""ChatService in process, on a real (tiny, random) llama, a real SessionManager and a real
snapshot store on disk: the events of a turn in order, the session rule, session and snapshot
operations, and the refusals a live session's journal gets."""

from __future__ import annotations

import pytest

from superlinear.engine import ChatRequest, PrefillProgress, SamplingParams
from superlinear.errors import Conflict, NotFound
from superlinear.service import ChatService, ChatTurn, Done, Persisted, Started, TextDelta


@pytest.fixture(scope="module")
def tiny_model(tiny_llama):
    from superlinear.model import load_model

    return load_model(str(tiny_llama))


@pytest.fixture
def service(tiny_model, tmp_path):
    from superlinear.sessions import SessionManager, SnapshotStore

    store = SnapshotStore(tmp_path / "snapshots")
    return ChatService(tiny_model, SessionManager(tiny_model, store, default_max_seq_len=2048), store)


def turn(text: str, session_id: str | None = None) -> ChatTurn:
    request = ChatRequest(messages=[{"role": "user", "content": text}],
                          sampling=SamplingParams(temperature=0, max_tokens=3))
    return ChatTurn(request, session_id=session_id)


def kinds(events) -> list[type]:
    return [type(e) for e in events if not isinstance(e, TextDelta | PrefillProgress)]


def test_a_turn_without_a_session(service):
    events = list(service.chat(turn("Hello")))
    assert kinds(events) == [Started, Done] and events[0] == Started(how=None)
    # the prefill's progress comes after Started and before the first token, ending at the total
    progress = [i for i, e in enumerate(events) if isinstance(e, PrefillProgress)]
    generated = [i for i, e in enumerate(events) if isinstance(e, TextDelta | Done)]
    assert progress and 0 < progress[0] and progress[-1] < generated[0]
    assert events[progress[-1]].done == events[progress[-1]].total == events[-1].usage["prompt_tokens"]
    assert service.list_sessions()["sessions"] == []  # the scratch conversation is no session


def test_session_turns_are_persisted_before_done_and_follow_the_session_rule(service):
    first = list(service.chat(turn("Hello", "s")))  # a first use creates the session
    assert kinds(first) == [Started, Persisted, Done]
    assert first[0].how == "new" and first[-2] == Persisted(ok=True)
    second = list(service.chat(turn("And then?", "s")))  # only the new message: appended
    assert second[0].how == "append"
    history = service.history("s")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[-1] == second[-1].message
    assert service.session_info("s")["persisted_position"] == service.session_info("s")["position"]


def test_started_comes_first_once_the_prompt_is_accepted(service):
    events = list(service.chat(turn("Hi", "cb")))
    assert events[0] == Started(how="new") and kinds(events).count(Started) == 1


def test_ephemeral_session_writes_nothing(service):
    """An ephemeral session's turns and changes are never journaled: the store stays empty."""
    service.create_session("tmp", ephemeral=True)
    list(service.chat(turn("Hi", "tmp")))
    assert service.session_info("tmp")["ephemeral"] is True
    assert service.session_info("tmp")["state_snapshot"] is None
    assert service.store.list() == []
    service.manager.persist_all()
    assert service.store.list() == []


def test_session_operations(service):
    service.create_session("a")
    list(service.chat(turn("One", "a")))
    fork = service.fork_session("a", "b")
    assert fork["id"] == "b" and fork["message_count"] == 2
    assert service.rollback("b", -2)["message_count"] == 0  # negative: drop the last two
    assert service.history("a") != service.history("b")
    assert service.close_session("b")["id"] == "b"
    with pytest.raises(NotFound):
        service.session_info("b")


def test_snapshot_operations_and_the_live_journal(service, tmp_path):
    list(service.chat(turn("Keep this", "j")))
    view = service.save("j", title="kept", tags=["t1"])
    assert view["object"] == "snapshot" and view["bytes"] > 0 and "files" not in view
    user_ids = [s["id"] for s in service.list_snapshots()]
    all_ids = [s["id"] for s in service.list_snapshots(include_session_state=True)]
    assert user_ids == [view["id"]] and len(all_ids) == 2  # the session's journal is listed on request
    journal = next(i for i in all_ids if i != view["id"])
    for refused in (lambda: service.update_snapshot(journal, title="x"), lambda: service.delete_snapshot(journal),
                    lambda: service.export_snapshot(journal, tmp_path / "j.tar")):
        with pytest.raises(Conflict):
            refused()
    assert service.update_snapshot(view["id"], title="renamed")["title"] == "renamed"
    path = service.export_snapshot(view["id"], tmp_path / "kept.tar")
    imported = service.import_snapshot(path, snapshot_id="copy")
    assert imported["id"] == "copy" and imported["title"] == "renamed"
    loaded = service.load("copy", session_id="from-copy")
    assert loaded["id"] == "from-copy" and service.history("from-copy") == service.history("j")
    service.delete_snapshot("copy")
    assert "copy" not in [s["id"] for s in service.list_snapshots()]
