"""The command bus: one handler per command, middleware order, error mapping, tracing; the API's
operations as commands that run against the API the context is bound to."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from superlinear.bus import Bus, Command, Context, map_errors, trace
from superlinear.errors import NotFound, Unavailable, UserError


@dataclass(frozen=True)
class Echo(Command):
    name = "test.echo"
    text: str = ""


@dataclass(frozen=True)
class OpenFile(Command):
    name = "test.open"
    path: str = ""


def echo(command: Echo, ctx: Context) -> str:
    return command.text.upper()


def open_file(command: OpenFile, ctx: Context) -> str:
    with open(command.path) as f:
        return f.read()


def make_bus() -> Bus:
    bus = Bus((map_errors, trace))
    bus.register(Echo, echo)
    bus.register(OpenFile, open_file)
    return bus


def test_dispatch_reaches_the_handler():
    assert make_bus().dispatch(Echo("hi")) == "HI"


def test_one_handler_per_command():
    bus = make_bus()
    with pytest.raises(ValueError, match="already registered"):
        bus.register(Echo, echo)


def test_unregistered_command_is_a_user_error():
    @dataclass(frozen=True)
    class Nobody(Command):
        name = "test.nobody"

    with pytest.raises(UserError, match="test.nobody"):
        make_bus().dispatch(Nobody())


def test_middleware_wraps_in_registration_order():
    calls: list[str] = []

    def outer(cmd, ctx, call_next):
        calls.append("outer>")
        result = call_next(cmd, ctx)
        calls.append("<outer")
        return result

    def inner(cmd, ctx, call_next):
        calls.append("inner>")
        return call_next(cmd, ctx) + "!"

    bus = Bus((outer, inner))
    bus.register(Echo, echo)
    assert bus.dispatch(Echo("a")) == "A!"
    assert calls == ["outer>", "inner>", "<outer"]


def test_missing_file_becomes_one_clear_user_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError) as info:
        make_bus().dispatch(OpenFile(str(missing)))
    assert str(missing) in info.value.message
    assert "\n" not in info.value.message


def test_user_errors_pass_through_unchanged():
    bus = Bus((map_errors,))

    def handler(cmd, ctx):
        raise NotFound("no session 'x'")

    bus.register(Echo, handler)
    with pytest.raises(NotFound, match="no session 'x'"):
        bus.dispatch(Echo())


def test_connection_errors_map_to_unavailable():
    bus = Bus((map_errors,))

    def handler(cmd, ctx):
        raise ConnectionRefusedError("refused")

    bus.register(Echo, handler)
    with pytest.raises(Unavailable):
        bus.dispatch(Echo())


def test_trace_prints_command_and_time(monkeypatch, capsys):
    monkeypatch.setenv("SPL_TRACE", "1")
    make_bus().dispatch(Echo("x"))
    err = capsys.readouterr().err
    assert "trace: test.echo(text='x') ok" in err and " ms" in err


def test_an_api_command_runs_against_the_bound_api():
    """``superlinear.protocol`` carry their behaviour: no handler, the context's API."""
    from superlinear import protocol as api
    from superlinear.errors import InvalidRequest

    class Api:
        def get_session(self, session_id):
            return {"id": session_id, "from": "bound api"}

    assert make_bus().dispatch(api.GetSession(session_id="s1"), Context(api=Api())) == {"id": "s1",
                                                                                          "from": "bound api"}
    with pytest.raises(InvalidRequest, match="no API"):
        make_bus().dispatch(api.GetSession(session_id="s1"))
