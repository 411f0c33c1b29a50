"""`spl chat` for real: the REPL in a pseudo-terminal (pexpect) against the shared spl server of
the run (the default model), plus `spl chat --once` / `--json`. The module's client state (input
history, the last session) is in a temporary folder of its own. (`spl chat --once` starting a
server when none runs: test_client_local_e2e.)
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest
from cli_helpers import CHAT_FOOTER as FOOTER
from server_helpers import free_port, shared_server

pexpect = pytest.importorskip("pexpect")

pytestmark = pytest.mark.slow

PROMPT = "›"
LEFT_PROMPT = "\x1b[?2004l"  # prompt_toolkit turns bracketed paste off when the prompt returns
SPL = [sys.executable, "-m", "superlinear.cli.main"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    shared = shared_server()
    root = tmp_path_factory.mktemp("chat")
    env = dict(shared.env, SPL_STATE_DIR=str(root / "state"), PYTHONUNBUFFERED="1", NO_COLOR="1")
    env.pop("SPL_SERVER_URL")  # every command here names the server with --url
    return {"url": shared.url, "env": env, "root": root, "http": shared.http}


def spawn_chat(server, *args):
    env = dict(server["env"], TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="160", LINES="40")
    child = pexpect.spawn(SPL[0], [*SPL[1:], "chat", "--url", server["url"], *args],
                          env=env, encoding="utf-8", timeout=60, dimensions=(40, 160))
    child.logfile_read = open(server["root"] / "chat-pty.log", "a")  # the screen, for failures
    return child


def send(child, text):
    """Type ``text`` and press Enter (a terminal sends CR; LF would be Ctrl-J)."""
    child.send(text + "\r")


def ask(child, text):
    send(child, text)
    child.expect(FOOTER)
    answer = child.before
    child.expect_exact(PROMPT)
    return answer


def test_repl_session(server):
    child = spawn_chat(server, "--new", "--temp", "0", "--max-tokens", "64")
    try:
        child.expect(r"new session (\S+)")
        first_session = child.match.group(1)
        child.expect_exact(PROMPT)

        # A question: a streamed answer, then the footer.
        answer = ask(child, "What is the capital of France?")
        assert "Paris" in answer, answer

        send(child, "/save my first chat")
        child.expect(r"saved snapshot (\S+)")
        snapshot = child.match.group(1)
        child.expect_exact(PROMPT)

        send(child, "/new")
        child.expect(r"new session (\S+)")
        assert child.match.group(1) != first_session
        child.expect_exact(PROMPT)

        child.send(f"/load {snapshot[:-3]}")
        child.expect_exact(snapshot)  # offered in the completion menu while typing
        child.send("\t")  # Tab picks it
        time.sleep(0.3)
        send(child, "")
        child.expect(r"loaded snapshot \S+ into session (\S+)")
        loaded = child.match.group(1)
        child.expect_exact(PROMPT)

        send(child, "/history")
        child.expect(r"1\s+user\s+What is the capital of France\?")
        child.expect(r"2\s+assistant\s+\S")
        child.expect_exact(PROMPT)

        # Ctrl-C during a long reply cancels it; the REPL and the session stay usable.
        send(child, "Write a long story about a dragon.")
        child.expect_exact(LEFT_PROMPT)  # the input was accepted; the terminal is cooked again
        child.expect(r"[A-Za-z]{3}")  # the reply has started streaming
        child.sendintr()
        child.expect_exact("[cancelled]")
        child.expect_exact(PROMPT)
        # A pasted message (bracketed paste) keeps its newline and is sent as one message.
        child.send("\x1b[200~Thanks.\nWhat is 2 + 2?\x1b[201~")
        ask(child, "")
        send(child, "/history")
        child.expect(r"\d+\s+user\s+Thanks\. What is 2 \+ 2\?")
        child.expect_exact(PROMPT)
        with server["http"]() as http:
            history = http.get(f"/v1/sessions/{loaded}/history").json()["messages"]
        roles = [m["role"] for m in history]
        assert roles[:2] == ["user", "assistant"] and roles[-2:] == ["user", "assistant"], roles
        assert all(a != b for a, b in zip(roles, roles[1:], strict=False)), roles  # user/assistant alternate
        assert history[-2]["content"] == "Thanks.\nWhat is 2 + 2?"

        send(child, "/bogus")
        child.expect_exact("error: unknown command /bogus")
        child.expect_exact(PROMPT)
        send(child, "/load no-such-snapshot")
        child.expect(r"error: .*no-such-snapshot")
        child.expect_exact(PROMPT)

        send(child, "/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

    history_file = server["root"] / "state" / "history" / "chat"  # persistent input history
    assert "What is the capital of France?" in history_file.read_text()

    # The next `spl chat` resumes the last session; Ctrl-D leaves.
    child = spawn_chat(server)
    try:
        child.expect(r"resumed session (\S+) \(4 messages")
        assert child.match.group(1) == loaded
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


class Proxy:
    """A TCP forwarder to the server that can be stopped and started again on the same port:
    to the REPL that is the server going away and coming back."""

    def __init__(self, target_url: str) -> None:
        host, port = target_url.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.listener = None
        self.conns: list[socket.socket] = []

    def start(self) -> None:
        import threading

        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread (Linux)
        except OSError:
            pass
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self.conns.clear()

    def _accept(self, listener) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_server_gone_and_back(server):
    proxy = Proxy(server["url"])
    proxy.start()
    child = pexpect.spawn(SPL[0], [*SPL[1:], "chat", "--url", proxy.url, "--new", "--temp", "0", "--max-tokens", "16"],
                          env=dict(server["env"], TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1"), encoding="utf-8",
                          timeout=60, dimensions=(40, 160))
    child.logfile_read = open(server["root"] / "chat-pty.log", "a")
    try:
        child.expect(r"new session (\S+)")
        child.expect_exact(PROMPT)
        proxy.stop()
        send(child, "Are you there?")
        child.expect(r"error: server gone: cannot reach the spl server at \S+")
        child.expect_exact(PROMPT)
        send(child, "/ls")
        child.expect_exact("error: server gone")
        child.expect_exact(PROMPT)
        proxy.start()  # the server is back: the next message goes through
        ask(child, "What is the capital of France?")
        send(child, "/history")
        child.expect(r"1\s+user\s+What is the capital of France\?")
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
        proxy.stop()
    assert child.exitstatus == 0


class Tee:
    """The pty's output, to the module's log file and kept for a terminal emulator."""

    def __init__(self, path):
        self.file = open(path, "a")
        self.chunks: list[str] = []

    def write(self, data):
        self.file.write(data)
        self.chunks.append(data)

    def flush(self):
        self.file.flush()

    def screen(self, columns, rows):
        pyte = pytest.importorskip("pyte")
        screen = pyte.Screen(columns, rows)
        pyte.Stream(screen).feed("".join(self.chunks))
        return screen


def test_rendering_wrapping_max_ctrl_c_and_history_in_a_narrow_terminal(server):
    """A 50-column colour terminal: a reply with a code block is rendered (rich's Markdown: the
    code highlighted, the fences gone) and its prose wraps at word boundaries; /max caps the reply; Ctrl-C keeps what
    was typed ahead and leaves no half turn on the server; /history numbers the messages as
    `spl session history` does."""
    columns, rows = 50, 200  # tall: the whole conversation stays on the emulated screen
    env = {k: v for k, v in server["env"].items() if k != "NO_COLOR"}
    env.update(TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", COLUMNS=str(columns), LINES=str(rows))
    child = pexpect.spawn(SPL[0], [*SPL[1:], "chat", "--url", server["url"], "--new", "--temp", "0"],
                          env=env, encoding="utf-8", timeout=240, dimensions=(rows, columns))
    tee = Tee(server["root"] / "chat-pty.log")
    child.logfile_read = tee
    try:
        child.expect(r"new session (\S+)")
        session = child.match.group(1)
        child.expect_exact(PROMPT)
        send(child, "/max 48")
        child.expect_exact("max tokens per reply: 48")
        child.expect_exact(PROMPT)

        question = "Write a Python function that adds two numbers."
        send(child, question)
        child.expect(FOOTER)
        assert "· length]" in child.match.group(0)  # the 48-token cap cut it
        child.expect_exact(PROMPT)
        with server["http"]() as http:
            reply = http.get(f"/v1/sessions/{session}/history").json()["messages"][1]
        assert reply["role"] == "assistant" and "```" in reply["content"], reply
        screen = tee.screen(columns, rows)
        shown = [line.rstrip() for line in screen.display]
        asked = next(i for i, line in enumerate(shown) if f"{PROMPT} Write a Python" in line)
        prompt_width = shown[asked].index(PROMPT) + len(PROMPT) + 1
        top = asked - (-(prompt_width + len(question)) // columns)  # below the (wrapped) question
        bottom = next(i for i, line in enumerate(shown) if "reached the cap of 48 tokens" in line)
        body = shown[top:bottom]
        assert not any(line.lstrip().startswith("```") for line in body), body  # rendered, not raw
        first_code = next(line.strip() for line in reply["content"].split("```")[1].splitlines()[1:] if line.strip())
        code_row = top + next(i for i, line in enumerate(body) if line.strip() == first_code)
        assert {screen.buffer[code_row][x].fg for x in range(columns)} - {"default"}, body  # highlighted
        # Every word on screen is a word of the reply: a word cut in two at the edge would not be.
        words = set(re.findall(r"\S+", reply["content"]))
        on_screen = [w for line in body for w in line.split()]
        assert on_screen and all(w in words for w in on_screen), (on_screen, words)
        assert all(len(line) <= columns for line in body)

        # Ctrl-C during a reply, with a question typed ahead: the reply stops, the typed text
        # waits at the prompt, and the server has no trace of the cancelled turn.
        send(child, "/max 400")  # long enough that the reply is still streaming at the Ctrl-C
        child.expect_exact("max tokens per reply: 400")
        child.expect_exact(PROMPT)
        send(child, "Write a long story about a dragon.")
        child.expect_exact(LEFT_PROMPT)
        child.expect(r"[A-Za-z]{3}")  # the reply is streaming
        child.send("what next")  # typed ahead (not echoed while the reply streams)
        time.sleep(0.5)
        child.sendintr()
        child.expect_exact("[cancelled]")
        child.expect_exact("what next")  # back at the prompt, in the input line
        time.sleep(0.5)
        screen = tee.screen(columns, rows)
        prompt_rows = [line for line in screen.display if PROMPT in line]
        assert prompt_rows[-1].rstrip().endswith("› what next"), prompt_rows[-1]
        child.sendintr()  # clears the line
        child.expect_exact(PROMPT)
        with server["http"]() as http:
            history = http.get(f"/v1/sessions/{session}/history").json()["messages"]
        assert [m["role"] for m in history] == ["user", "assistant"], history

        send(child, "/history")
        child.expect(r"1\s+user\s+Write a Python function")
        child.expect(r"2\s+assistant\s+\S")
        child.expect_exact(PROMPT)
        listed = subprocess.run([*SPL, "session", "history", session], capture_output=True, text=True,
                                timeout=60, env=dict(server["env"], SPL_SERVER_URL=server["url"]))
        assert listed.returncode == 0, listed.stderr
        assert re.findall(r"^\[(\d+)\] (\w+):", listed.stdout, re.M) == [("1", "user"), ("2", "assistant")]
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()


def test_ctrl_c_as_the_reply_ends_leaves_no_half_turn(server):
    """Ctrl-C that lands after the server stored the turn but before its end reached the REPL
    (here: exactly when the final event arrives) still leaves the session as before the turn."""
    import io

    from superlinear import connect
    from superlinear.api import Done
    from superlinear.plugins.chat.repl import ChatRepl, ChatSettings

    client = connect(server["url"], api_key=server["env"]["SPL_API_KEY"])
    real_chat = client.chat

    def interrupted_at_the_end(turn):
        stream = real_chat(turn)
        try:
            for event in stream:
                if isinstance(event, Done) and interrupt["on"]:
                    raise KeyboardInterrupt
                yield event
        finally:
            stream.close()

    interrupt = {"on": False}
    client.chat = interrupted_at_the_end
    out = io.StringIO()
    repl = ChatRepl(client, name="race", new=True, out=out, settings=ChatSettings(temperature=0.0, max_tokens=6))
    try:
        repl.open_session()
        repl.handle("Say hello.")
        interrupt["on"] = True
        repl.handle("Say goodbye.")
        assert out.getvalue().rstrip().endswith("[cancelled]")
        history = client.history(repl.session_id)
        assert [m["content"] for m in history][:1] == ["Say hello."] and len(history) == 2, history
    finally:
        client.close_session(repl.session_id)
        client.close()


def run_once(server, *args):
    env = dict(server["env"])
    return subprocess.run([*SPL, "chat", "--url", server["url"],
                           "--temp", "0", "--max-tokens", "24", "--once", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_once_prints_the_answer(server):
    result = run_once(server, "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert FOOTER.search(result.stderr), result.stderr


def test_once_json(server):
    result = run_once(server, "What is the capital of France?", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert "Paris" in data["content"]
    assert data["finish_reason"] in ("stop", "length")
    assert data["usage"]["completion_tokens"] > 0


def test_once_server_gone_is_one_line():
    port = free_port()
    result = subprocess.run([*SPL, "chat", "--url",
                             f"http://127.0.0.1:{port}", "--once", "hi"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spl: error: cannot reach the spl server"), result.stderr


def test_a_mistyped_session_is_refused_and_max_is_kept(server):
    """`--session` names an existing session: a typo is one line (exit 2) with the close match and
    how to start it, never a new session; `/max` set in one `spl chat` holds in the next."""
    with server["http"]() as http:
        http.post("/v1/sessions", json={"session_id": "weekly-notes"}).raise_for_status()
    child = spawn_chat(server, "--session", "weekly-note")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2, child.before
    lines = [line for line in child.before.splitlines() if line.strip()]
    assert lines == ["spl: error: no session 'weekly-note': did you mean weekly-notes? "
                     "`spl chat --new --session weekly-note` starts it"], lines
    with server["http"]() as http:
        assert http.get("/v1/sessions/weekly-note").status_code == 404

    child = spawn_chat(server, "--session", "weekly-notes")
    child.expect(r"resumed session weekly-notes")
    child.expect_exact(PROMPT)
    send(child, "/max 77")
    child.expect_exact("max tokens per reply: 77")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child = spawn_chat(server, "--session", "weekly-notes")
    child.expect_exact(PROMPT)
    send(child, "/max")
    child.expect_exact("max tokens per reply: 77")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    with server["http"]() as http:
        http.delete("/v1/sessions/weekly-notes")
